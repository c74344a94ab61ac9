package inbox

// WorkerStatements returns the worker's claim and completion, for the
// figures that run them in a raw loop: $1 scope, $2 how many, $3 token,
// $4 lease in ms for the claim; $1 scope, $2 provider, $3 event ID, $4
// token for the completion.
func WorkerStatements() (claim, complete string) {
	s := newWorkerStatements("", false)
	return s.claim, s.complete
}

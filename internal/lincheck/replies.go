package lincheck

import (
	"cmp"
	"fmt"
	"slices"
	"time"
)

// Exchange is one request a client sent through the middleware, and the
// answer it got, for [CheckReplies].
type Exchange struct {
	Client   int
	Key      string        // the request's Idempotency-Key
	Sent     time.Duration // when the request was sent, since the run began
	Received time.Duration // when the answer, or the error, came
	Status   int           // 0 when no answer came (Err)
	Body     string
	Replayed bool // the answer carried the replay header
	Err      error
}

// Execution is one run of the handler, as the handler logged it when it
// started.
type Execution struct {
	Key     string
	N       int           // 1 for the key's first execution, then 2, 3...
	Started time.Duration // since the run began
	Status  int           // what it answered
	Body    string        // what it answered: no two executions answer the same
}

// CheckReplies checks what the middleware promises the clients of a
// handler whose answer differs per execution:
//
//   - every 2xx answer clients got for a key is one and the same (status
//     and body): once a 2xx reached a client, every later replay of the
//     key must repeat it, so two that differ mean one was contradicted
//     (include replays made after the run, when the key has settled);
//   - a key's handler ran more than once only if no 2xx answer of an
//     earlier execution reached a client: the work done for a client that
//     was told it succeeded is not done again.
//
// It returns one line per violation, naming the clients, executions and
// times; none when the promises held.
func CheckReplies(executions []Execution, exchanges []Exchange) []string {
	byBody := make(map[string]Execution, len(executions))
	runs := make(map[string][]Execution)
	for _, e := range executions {
		byBody[e.Key+"\x00"+e.Body] = e
		runs[e.Key] = append(runs[e.Key], e)
	}
	successes := make(map[string][]Exchange)
	for _, x := range exchanges {
		if x.Err == nil && x.Status >= 200 && x.Status < 300 {
			successes[x.Key] = append(successes[x.Key], x)
		}
	}
	var violations []string
	what := func(x Exchange) string {
		e, ok := byBody[x.Key+"\x00"+x.Body]
		switch {
		case !ok:
			return "from no execution"
		case x.Replayed:
			return fmt.Sprintf("replay of execution %d", e.N)
		}
		return fmt.Sprintf("execution %d", e.N)
	}
	for _, key := range sortedKeys(successes) {
		got := successes[key]
		slices.SortStableFunc(got, func(a, b Exchange) int { return cmp.Compare(a.Received, b.Received) })
		first := got[0]
		seen := map[string]bool{first.Body: true}
		for _, x := range got[1:] {
			if x.Status == first.Status && x.Body == first.Body {
				continue
			}
			if seen[x.Body] {
				continue // reported once per different answer
			}
			seen[x.Body] = true
			violations = append(violations, fmt.Sprintf(
				"key %q: client %d got %d %q (%s, sent %v, received %v), but later client %d got %d %q (%s, sent %v, received %v)",
				key, first.Client, first.Status, first.Body, what(first), at(int64(first.Sent)), at(int64(first.Received)),
				x.Client, x.Status, x.Body, what(x), at(int64(x.Sent)), at(int64(x.Received))))
		}
		unknown := make(map[string]bool)
		for _, x := range got {
			if _, ok := byBody[x.Key+"\x00"+x.Body]; !ok && !unknown[x.Body] {
				unknown[x.Body] = true
				violations = append(violations, fmt.Sprintf("key %q: client %d got %d %q at %v, which no execution answered",
					key, x.Client, x.Status, x.Body, at(int64(x.Received))))
			}
		}
	}
	for _, key := range sortedKeys(runs) {
		es := runs[key]
		slices.SortFunc(es, func(a, b Execution) int { return cmp.Compare(a.N, b.N) })
		// The earliest-received 2xx of any execution but the last: the
		// executions after it should not have run.
		var told *Exchange
		for i, x := range successes[key] {
			e, ok := byBody[key+"\x00"+x.Body]
			if ok && e.N < es[len(es)-1].N && (told == nil || x.Received < told.Received) {
				told = &successes[key][i]
			}
		}
		if told == nil {
			continue
		}
		e := byBody[key+"\x00"+told.Body]
		again := es[e.N] // the execution after e (N counts from 1)
		when := "before it started"
		if told.Received > again.Started {
			when = "after it started"
		}
		violations = append(violations, fmt.Sprintf(
			"key %q: the handler ran %d times: execution %d started at %v although client %d had got execution %d's %d %q (received %v, %s)",
			key, len(es), again.N, at(int64(again.Started)), told.Client, e.N, told.Status, told.Body, at(int64(told.Received)), when))
	}
	return violations
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}

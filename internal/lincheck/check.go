package lincheck

import (
	"cmp"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/anishathalye/porcupine"
)

// Result is what [Check] found in one history.
type Result struct {
	// Verdict is porcupine.Ok (linearizable), porcupine.Illegal (not), or
	// porcupine.Unknown (the check timed out: no verdict).
	Verdict    porcupine.CheckResult
	Operations int // operations checked
	Unknown    int // of which failed with an unknown outcome
	LeaseLost  int // of which were refused with ErrLeaseLost
	Keys       int // keys, each checked on its own
	Took       time.Duration
	// Failing names the keys whose operations are not linearizable, in
	// order, when the Verdict is Illegal.
	Failing []string
}

func (r Result) String() string {
	s := fmt.Sprintf("%d operations (%d of unknown outcome, %d refused with a lost lease) on %d keys, checked in %v: %s",
		r.Operations, r.Unknown, r.LeaseLost, r.Keys, r.Took.Round(time.Millisecond), r.Verdict)
	if len(r.Failing) > 0 {
		s += fmt.Sprintf(" (%d keys fail)", len(r.Failing))
	}
	return s
}

// Check checks history, from [Recorder.History], against [Model], for at
// most timeout (0: no limit). When the history is not linearizable it
// checks each key on its own to name those that fail.
func Check(history []porcupine.Operation, timeout time.Duration) Result {
	model := Model()
	parts := partition(history)
	res := Result{Operations: len(history), Keys: len(parts)}
	for _, op := range history {
		switch op.Output.(Output).Outcome {
		case Unknown:
			res.Unknown++
		case LeaseLost:
			res.LeaseLost++
		}
	}
	start := time.Now()
	res.Verdict = porcupine.CheckOperationsTimeout(model, history, timeout)
	res.Took = time.Since(start)
	if res.Verdict != porcupine.Illegal {
		return res
	}
	for _, part := range parts {
		left := timeout - time.Since(start)
		if timeout > 0 && left <= 0 {
			break
		}
		if porcupine.CheckOperationsTimeout(model, part, max(left, 0)) == porcupine.Illegal {
			res.Failing = append(res.Failing, part[0].Input.(Input).Key)
		}
	}
	slices.Sort(res.Failing)
	return res
}

// Only returns the operations of history on keys (all of them when keys
// is empty).
func Only(history []porcupine.Operation, keys []string) []porcupine.Operation {
	if len(keys) == 0 {
		return history
	}
	var ops []porcupine.Operation
	for _, op := range history {
		if slices.Contains(keys, op.Input.(Input).Key) {
			ops = append(ops, op)
		}
	}
	return ops
}

// Visualize writes porcupine's HTML visualization of the operations of
// history on keys (all of them when keys is empty) to path: each key's
// operations on a time line per client, with the longest orders the model
// accepts and the state after each step.
func Visualize(history []porcupine.Operation, keys []string, path string) error {
	model := Model()
	_, info := porcupine.CheckOperationsVerbose(model, Only(history, keys), 0)
	return porcupine.VisualizePath(model, info, path)
}

// Explain describes why the operations of history on key are not
// linearizable, for a test's failure message: how many of them the
// longest order the model accepts takes, the last steps of that order,
// and the operations it cannot take next, earliest answered first.
func Explain(history []porcupine.Operation, key string) string {
	ops := Only(history, []string{key})
	model := Model()
	verdict, info := porcupine.CheckOperationsVerbose(model, ops, 0)
	if verdict != porcupine.Illegal {
		return fmt.Sprintf("key %q: %d operations, %s", key, len(ops), verdict)
	}
	var longest []int
	for _, part := range info.PartialLinearizations() {
		for _, lin := range part {
			if len(lin) > len(longest) {
				longest = lin
			}
		}
	}
	var b strings.Builder
	fmt.Fprintf(&b, "key %q: %d operations, the longest order the model accepts takes %d of them", key, len(ops), len(longest))
	s := model.Init()
	for i, id := range longest {
		op := ops[id]
		_, s = model.Step(s, op.Input, op.Output)
		if i >= len(longest)-3 {
			fmt.Fprintf(&b, "\n  %s\n    state: %s", describe(op), model.DescribeState(s))
		}
	}
	taken := make(map[int]bool, len(longest))
	for _, id := range longest {
		taken[id] = true
	}
	var rest []int
	for id := range ops {
		if !taken[id] {
			rest = append(rest, id)
		}
	}
	slices.SortFunc(rest, func(a, b int) int {
		return cmp.Or(cmp.Compare(ops[a].Return, ops[b].Return), cmp.Compare(ops[a].Call, ops[b].Call))
	})
	fmt.Fprintf(&b, "\n  and cannot take next:")
	for i, id := range rest {
		if i == 3 {
			fmt.Fprintf(&b, "\n  ... and %d more", len(rest)-i)
			break
		}
		fmt.Fprintf(&b, "\n  %s", describe(ops[id]))
	}
	return b.String()
}

// describe describes an operation with its client and times.
func describe(op porcupine.Operation) string {
	out := op.Output.(Output)
	return fmt.Sprintf("client %d [%s, %s]: %s", op.ClientId, at(op.Call), at(out.Return), DescribeOperation(op.Input.(Input), out))
}

// Timeline lists the operations of history on keys (all of them when
// keys is empty), one a line, by call time: client, call and answer
// times, the call and its answer.
func Timeline(history []porcupine.Operation, keys []string) string {
	ops := slices.Clone(Only(history, keys))
	slices.SortStableFunc(ops, func(a, b porcupine.Operation) int { return cmp.Compare(a.Call, b.Call) })
	var b strings.Builder
	for _, op := range ops {
		if len(keys) != 1 {
			fmt.Fprintf(&b, "%s ", op.Input.(Input).Key)
		}
		b.WriteString(describe(op))
		b.WriteByte('\n')
	}
	return b.String()
}

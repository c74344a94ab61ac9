package lincheck_test

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/anishathalye/porcupine"

	"github.com/seed70ea8305/idempotency/internal/lincheck"
)

// op is one operation of a hand-written history: client, call and return
// in milliseconds, what was asked and what came back.
type op struct {
	client    int
	call, ret int64
	in        lincheck.Input
	out       lincheck.Output
}

func ms(n int64) int64 { return n * int64(time.Millisecond) }

// history builds a history of ops on key "k" (unless their input names
// another), through a Recorder as the clients would.
func history(ops ...op) []porcupine.Operation {
	rec := lincheck.NewRecorder()
	for _, o := range ops {
		if o.in.Key == "" {
			o.in.Key = "k"
		}
		o.in.Call, o.out.Return = ms(o.call), ms(o.ret)
		if o.in.Deadline != 0 {
			o.in.Deadline = ms(o.in.Deadline)
		}
		rec.Add(o.client, o.in, o.out)
	}
	return rec.History()
}

// Inputs and outputs, short.

func acquire(token string, lease time.Duration) lincheck.Input {
	return lincheck.Input{Op: lincheck.Acquire, Token: token, Fingerprint: "fp", Lease: lease}
}

func acquireBy(token string, lease time.Duration, deadlineMS int64) lincheck.Input {
	in := acquire(token, lease)
	in.Deadline = deadlineMS
	return in
}

func extend(token string, lease time.Duration) lincheck.Input {
	return lincheck.Input{Op: lincheck.Extend, Token: token, Lease: lease}
}

func complete(token, body string) lincheck.Input {
	return lincheck.Input{Op: lincheck.Complete, Token: token, Fingerprint: "fp", TTL: time.Hour,
		Response: lincheck.Response{Status: 201, Body: body}}
}

func release(token string) lincheck.Input {
	return lincheck.Input{Op: lincheck.Release, Token: token}
}

var get = lincheck.Input{Op: lincheck.Get}

var (
	ok        = lincheck.Output{Outcome: lincheck.OK}
	leaseLost = lincheck.Output{Outcome: lincheck.LeaseLost}
	unknown   = lincheck.Output{Outcome: lincheck.Unknown}
	none      = lincheck.Output{Outcome: lincheck.OK, Found: lincheck.Record{State: lincheck.None}}
)

func claimed(fence uint64) lincheck.Output {
	return lincheck.Output{Outcome: lincheck.OK, Fence: fence}
}

func inFlight(owner string) lincheck.Output {
	return lincheck.Output{Outcome: lincheck.OK, Found: lincheck.Record{State: lincheck.InFlight, Token: owner, Fingerprint: "fp"}}
}

func completed(body string) lincheck.Output {
	return lincheck.Output{Outcome: lincheck.OK, Found: lincheck.Record{State: lincheck.Completed, Fingerprint: "fp",
		Response: lincheck.Response{Status: 201, Body: body}}}
}

const long, short = time.Hour, 10 * time.Millisecond

// TestModel checks the model on hand-written histories: those the
// protocol allows must pass, and each way of breaking it must fail, so
// that the checker cannot silently accept everything.
func TestModel(t *testing.T) {
	tests := []struct {
		name         string
		linearizable bool
		ops          []op
	}{
		{"claim, renew, complete, replay", true, []op{
			{0, 0, 1, acquire("A", long), claimed(1)},
			{1, 2, 3, acquire("B", long), inFlight("A")},
			{0, 4, 5, extend("A", long), ok},
			{1, 5, 6, get, inFlight("A")},
			{0, 6, 7, complete("A", "a"), ok},
			{1, 8, 9, acquire("C", long), completed("a")},
			{1, 10, 11, get, completed("a")},
			{0, 12, 13, extend("A", long), leaseLost},
			{0, 14, 15, release("A"), leaseLost},
		}},
		{"concurrent claims: one wins, in either order of calls", true, []op{
			{1, 1, 9, acquire("B", long), inFlight("A")},
			{0, 0, 10, acquire("A", long), claimed(1)},
		}},
		{"released key claimed again with a greater fence", true, []op{
			{0, 0, 1, acquire("A", long), claimed(7)},
			{0, 2, 3, release("A"), ok},
			{1, 4, 5, get, none},
			{1, 6, 7, acquire("B", long), claimed(9)},
		}},
		{"lapsed lease: the key is claimed again, the old owner refused", true, []op{
			{0, 0, 1, acquire("A", short), claimed(5)},
			{1, 12, 13, acquire("B", short), claimed(6)},
			{0, 14, 15, extend("A", short), leaseLost},
			{0, 16, 17, complete("A", "a"), leaseLost},
		}},
		{"lapse seen by a read, then by the owner", true, []op{
			{0, 0, 1, acquire("A", short), claimed(1)},
			{1, 11, 12, get, none},
			{0, 13, 14, extend("A", short), leaseLost},
		}},
		{"renewal counts from its call", true, []op{
			{0, 0, 1, acquire("A", short), claimed(1)},
			{0, 8, 9, extend("A", short), ok},
			{1, 15, 16, acquire("B", short), inFlight("A")},
			{1, 18, 19, acquire("C", short), claimed(2)},
		}},
		{"unknown completion that took effect", true, []op{
			{0, 0, 1, acquire("A", long), claimed(1)},
			{0, 5, 6, complete("A", "a"), unknown},
			{1, 7, 8, acquire("B", long), completed("a")},
		}},
		{"unknown completion that never took effect", true, []op{
			{0, 0, 1, acquire("A", short), claimed(1)},
			{0, 5, 6, complete("A", "a"), unknown},
			{1, 20, 21, get, none},
			{1, 22, 23, acquire("B", short), claimed(2)},
		}},
		{"completion repeated by its token", true, []op{
			{0, 0, 1, acquire("A", long), claimed(1)},
			{0, 2, 3, complete("A", "a"), unknown},
			{0, 4, 5, complete("A", "a"), ok},
			{0, 6, 7, complete("A", "a"), ok},
			{1, 8, 9, get, completed("a")},
		}},
		{"unknown claim taken back; the next fence is greater", true, []op{
			{0, 0, 5, acquireBy("A", long, 5), unknown},
			{0, 6, 7, release("A"), ok},
			{1, 8, 9, acquire("B", long), claimed(2)},
		}},
		{"unknown claim that never landed", true, []op{
			{0, 0, 5, acquireBy("A", long, 5), unknown},
			{0, 6, 7, release("A"), ok}, // nothing holds the key
			{1, 8, 9, acquire("B", long), claimed(1)},
		}},
		{"release repeated by its token", true, []op{
			{0, 0, 1, acquire("A", long), claimed(1)},
			{0, 2, 3, release("A"), ok},
			{0, 4, 5, release("A"), ok},
			{1, 6, 7, acquire("B", long), claimed(2)},
		}},
		{"release of a free key", true, []op{
			{0, 0, 1, release("A"), ok},
			{1, 2, 3, acquire("B", long), claimed(1)},
		}},
		{"release of the token's own lapsed claim", true, []op{
			{0, 0, 1, acquire("A", short), claimed(1)},
			{0, 20, 21, release("A"), ok},
			{1, 22, 23, acquire("B", long), claimed(2)},
		}},
		{"release of another's lapsed claim", true, []op{
			{0, 0, 1, acquire("A", short), claimed(1)},
			{1, 20, 21, release("B"), ok},
			{1, 22, 23, acquire("B", long), claimed(2)},
		}},
		{"stale release refused after another claim", true, []op{
			{0, 0, 1, acquire("A", short), claimed(1)},
			{1, 20, 21, acquire("B", long), claimed(2)},
			{0, 22, 23, release("A"), leaseLost},
			{1, 24, 25, get, inFlight("B")},
		}},
		{"release refused on a completed record", true, []op{
			{0, 0, 1, acquire("A", long), claimed(1)},
			{0, 2, 3, complete("A", "a"), ok},
			{1, 4, 5, release("B"), leaseLost},
			{0, 6, 7, release("A"), leaseLost},
		}},
		{"completed record expires after its TTL", true, []op{
			{0, 0, 1, acquire("A", long), claimed(1)},
			{0, 2, 3, lincheck.Input{Op: lincheck.Complete, Token: "A", Fingerprint: "fp", TTL: short, Response: lincheck.Response{Status: 201, Body: "a"}}, ok},
			{1, 14, 15, acquire("B", long), claimed(2)},
		}},

		{"two owners at once", false, []op{
			{0, 0, 1, acquire("A", long), claimed(1)},
			{1, 2, 3, acquire("B", long), claimed(2)},
		}},
		{"two owners at once, the second after a read", false, []op{
			{0, 0, 1, acquire("A", long), claimed(1)},
			{1, 2, 3, get, inFlight("A")},
			{1, 4, 5, acquire("B", long), claimed(2)},
		}},
		{"fence going backwards", false, []op{
			{0, 0, 1, acquire("A", long), claimed(5)},
			{0, 2, 3, release("A"), ok},
			{1, 4, 5, acquire("B", long), claimed(3)},
		}},
		{"fence repeated", false, []op{
			{0, 0, 1, acquire("A", long), claimed(5)},
			{0, 2, 3, release("A"), ok},
			{1, 4, 5, acquire("B", long), claimed(5)},
		}},
		{"fence not above an unknown claim that landed", false, []op{
			{0, 0, 5, acquireBy("A", long, 5), unknown},
			{1, 6, 7, get, inFlight("A")}, // it landed (a release that succeeds no longer tells)
			{0, 8, 9, release("A"), ok},
			{1, 10, 11, acquire("B", long), claimed(1)},
		}},
		{"completed response replaced", false, []op{
			{0, 0, 1, acquire("A", long), claimed(1)},
			{0, 2, 3, complete("A", "a"), ok},
			{1, 4, 5, acquire("B", long), completed("b")},
		}},
		{"completed record claimed again", false, []op{
			{0, 0, 1, acquire("A", long), claimed(1)},
			{0, 2, 3, complete("A", "a"), ok},
			{1, 4, 5, acquire("B", long), claimed(2)},
		}},
		{"completed record read as gone", false, []op{
			{0, 0, 1, acquire("A", long), claimed(1)},
			{0, 2, 3, complete("A", "a"), ok},
			{1, 4, 5, get, none},
		}},
		{"lease lapsing early", false, []op{
			{0, 0, 1, acquire("A", 100*time.Millisecond), claimed(1)},
			{1, 50, 51, acquire("B", long), claimed(2)},
		}},
		{"renewal ignored", false, []op{
			{0, 0, 1, acquire("A", short), claimed(1)},
			{0, 8, 9, extend("A", short), ok},
			{1, 12, 13, acquire("B", short), claimed(2)},
		}},
		{"stale owner completes", false, []op{
			{0, 0, 1, acquire("A", short), claimed(1)},
			{1, 20, 21, acquire("B", long), claimed(2)},
			{0, 22, 23, complete("A", "a"), ok},
		}},
		{"repeated release refused", false, []op{
			{0, 0, 1, acquire("A", long), claimed(1)},
			{0, 2, 3, release("A"), ok},
			{0, 4, 5, release("A"), leaseLost},
		}},
		{"release of a free key refused", false, []op{
			{0, 0, 1, release("A"), leaseLost},
		}},
		{"owner's release refused within its lease", false, []op{
			{0, 0, 1, acquire("A", long), claimed(1)},
			{0, 2, 3, release("A"), leaseLost},
		}},
		{"owner's release refused after its lease lapsed, nobody else claiming", false, []op{
			{0, 0, 1, acquire("A", short), claimed(1)},
			{0, 20, 21, release("A"), leaseLost},
		}},
		{"release by another token", false, []op{
			{0, 0, 1, acquire("A", long), claimed(1)},
			{1, 2, 3, release("B"), ok},
		}},
		{"stale owner releases", false, []op{
			{0, 0, 1, acquire("A", short), claimed(1)},
			{1, 20, 21, acquire("B", long), claimed(2)},
			{0, 22, 23, release("A"), ok},
		}},
		{"other token completes", false, []op{
			{0, 0, 1, acquire("A", long), claimed(1)},
			{1, 2, 3, complete("B", "b"), ok},
		}},
		{"owner refused within its lease", false, []op{
			{0, 0, 1, acquire("A", long), claimed(1)},
			{0, 5, 6, extend("A", long), leaseLost},
		}},
		{"repeated completion refused", false, []op{
			{0, 0, 1, acquire("A", long), claimed(1)},
			{0, 2, 3, complete("A", "a"), ok},
			{0, 4, 5, complete("A", "a"), leaseLost},
		}},
		{"completed record renewed", false, []op{
			{0, 0, 1, acquire("A", long), claimed(1)},
			{0, 2, 3, complete("A", "a"), ok},
			{0, 4, 5, extend("A", long), ok},
		}},
		{"in-flight record with another owner", false, []op{
			{0, 0, 1, acquire("A", long), claimed(1)},
			{1, 2, 3, acquire("B", long), inFlight("C")},
		}},
		{"acquire answering neither claim nor record", false, []op{
			{0, 0, 1, acquire("A", long), none},
		}},
		{"claim landing after its deadline", false, []op{
			{0, 0, 1, acquire("A", short), claimed(1)},
			{1, 2, 3, acquireBy("B", long, 3), unknown},
			{2, 20, 21, get, inFlight("B")},
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			h := history(tt.ops...)
			res := lincheck.Check(h, time.Minute)
			want := porcupine.Illegal
			if tt.linearizable {
				want = porcupine.Ok
			}
			if res.Verdict != want {
				t.Errorf("verdict %s, want %s", res.Verdict, want)
				if res.Verdict == porcupine.Illegal {
					t.Log(lincheck.Explain(h, "k"))
				}
			}
		})
	}
}

// TestCheckNamesFailingKeys: a history with one bad key among good ones
// names that key, and the visualization and the explanation are written.
func TestCheckNamesFailingKeys(t *testing.T) {
	var ops []op
	for _, key := range []string{"good-1", "bad", "good-2"} {
		in := func(i lincheck.Input) lincheck.Input { i.Key = key; return i }
		ops = append(ops,
			op{0, 0, 1, in(acquire("A-"+key, long)), claimed(1)},
			op{0, 2, 3, in(complete("A-"+key, "a")), ok})
		if key == "bad" {
			ops = append(ops, op{1, 4, 5, in(get), completed("b")})
		}
	}
	h := history(ops...)
	res := lincheck.Check(h, time.Minute)
	if res.Verdict != porcupine.Illegal || len(res.Failing) != 1 || res.Failing[0] != "bad" {
		t.Fatalf("got %s, failing %q; want Illegal, failing [bad]", res, res.Failing)
	}
	if res.Keys != 3 || res.Operations != 7 {
		t.Errorf("counted %d keys, %d operations; want 3, 7", res.Keys, res.Operations)
	}
	explanation := lincheck.Explain(h, "bad")
	for _, want := range []string{"takes 2 of them", `Get() → completed 201 "b"`} {
		if !strings.Contains(explanation, want) {
			t.Errorf("explanation lacks %q:\n%s", want, explanation)
		}
	}
	path := filepath.Join(t.TempDir(), "history.html")
	if err := lincheck.Visualize(h, res.Failing, path); err != nil {
		t.Fatal(err)
	}
	page, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(page), `completed 201 \"b\"`) {
		t.Errorf("the visualization (%d bytes) does not show the bad read", len(page))
	}
}

// TestUnknownReturnsAtEnd: an operation whose outcome is unknown returns
// after every other answer.
func TestUnknownReturnsAtEnd(t *testing.T) {
	h := history(
		op{0, 0, 2, acquire("A", long), unknown},
		op{1, 1, 5, get, none},
	)
	if h[0].Return <= h[1].Return {
		t.Errorf("unknown operation returns at %d, before the last answer at %d", h[0].Return, h[1].Return)
	}
	if got := h[0].Output.(lincheck.Output).Return; got != ms(2) {
		t.Errorf("its output keeps the time the error came, %d; got %d", ms(2), got)
	}
}

package lincheck

import (
	"fmt"
	"hash/maphash"
	"strings"
	"time"

	"github.com/anishathalye/porcupine"
)

// Op names a store call.
type Op uint8

// The store calls a history holds: [idempotency.Store]'s four and
// [idempotency.Inspector]'s Get.
const (
	Acquire Op = iota + 1
	Extend
	Complete
	Release
	Get
)

func (o Op) String() string {
	switch o {
	case Acquire:
		return "Acquire"
	case Extend:
		return "Extend"
	case Complete:
		return "Complete"
	case Release:
		return "Release"
	case Get:
		return "Get"
	}
	return fmt.Sprintf("Op(%d)", uint8(o))
}

// Input is what a client asked of the store: the Input of a
// [porcupine.Operation] in a history.
type Input struct {
	Op          Op
	Key         string
	Token       string        // the caller's token; Acquire: the claim's
	Fingerprint string        // Acquire: the claim's; Complete: the record's
	Lease       time.Duration // Acquire, Extend
	TTL         time.Duration // Complete
	Response    Response      // Complete
	// Call is when the call was made, in nanoseconds on the history's
	// monotonic clock, as the operation's Call.
	Call int64
	// Deadline is, for Acquire, the call's deadline on the same clock (a
	// store must not claim after it); 0 when it had none.
	Deadline int64
}

// Response is the part of a stored response that the model compares.
type Response struct {
	Status int
	Body   string
}

// Outcome says how a store call ended.
type Outcome uint8

const (
	// OK: the call returned no error.
	OK Outcome = iota
	// LeaseLost: the call returned an error wrapping
	// idempotency.ErrLeaseLost; it changed nothing.
	LeaseLost
	// Unknown: the call returned another error (a timeout, a reset
	// connection): it may or may not have taken effect.
	Unknown
)

func (o Outcome) String() string {
	switch o {
	case OK:
		return "ok"
	case LeaseLost:
		return "lease lost"
	case Unknown:
		return "failed, outcome unknown"
	}
	return fmt.Sprintf("Outcome(%d)", uint8(o))
}

// RecordState is the state of a key's record.
type RecordState uint8

// The states of a record. The model never holds a suspended record (the
// clients record no recovery points); a store that returns one is wrong.
const (
	None RecordState = iota
	InFlight
	Completed
	Suspended
)

// Record is a record as Acquire or Get returned it: the part the model
// compares.
type Record struct {
	State       RecordState
	Token       string // in flight: the owner's
	Fingerprint string
	Response    Response // completed
}

// Output is what a client got: the Output of a [porcupine.Operation].
type Output struct {
	Outcome Outcome
	Fence   uint64 // Acquire: the claim's fence, 0 when it did not claim
	Found   Record // Acquire that did not claim, and Get: the record there
	// Return is when the answer came, on the history's clock. The
	// operation's own Return is the end of the history when the outcome is
	// Unknown; this one stays when the error came.
	Return int64
}

// Clock tolerances of the model, both in the direction that lets a store
// be more permissive, so that the model reports only what no clock can
// explain.
const (
	// DriftPPM is how much faster, in parts per million, the store's clock
	// may run than the clients': a lease (or TTL) of d may lapse d*DriftPPM
	// earlier, by the client's clock, than d after the call that set it.
	// 0.1%, as the middleware assumes (beyond NTP's 500 ppm slew limit).
	DriftPPM = 1000

	// DeadlineSlack is how late after its deadline, by the client's clock,
	// a claim may still land: Redis compares whole milliseconds.
	DeadlineSlack = 2 * time.Millisecond
)

// state is one key's state in the model. It is comparable: porcupine
// compares states with ==.
type state struct {
	// clock is the latest call time of the operations applied so far:
	// they are linearized in order, each after its call, so the next one
	// takes effect no earlier.
	clock int64
	rec   RecordState
	token string // in flight: the owner; completed: the token that completed it
	fp    string
	resp  Response // completed
	fence uint64   // the fence of the record's claim; 0 when unknown
	// from is the earliest the store can have started the record's lease
	// (in flight) or TTL (completed): the call of the Acquire, Extend or
	// Complete that set it. The store counts from when it received the
	// command, which is no earlier.
	from int64
	span time.Duration // the lease or TTL counted from from
	// maxFence is the greatest fence handed out for the key so far, or a
	// lower bound of it after a claim whose fence is unknown.
	maxFence uint64
}

// Model returns the store protocol as a porcupine model, one state machine
// per key. A key has no record, a claim in flight (owner token,
// fingerprint, fence, lease) or a completed record (the token that
// completed it, fingerprint, response, TTL), and the greatest fence handed
// out for it so far. The rules, for a call by token T:
//
//   - Acquire claims a key that has no record, or whose lease or TTL may
//     have run out (below), with a fence greater than every fence the key
//     had; else it changes nothing and returns the record as it is (the
//     owner's token and fingerprint, or the response). A claim does not
//     land after the call's deadline.
//   - Extend and Complete act only while T owns the claim in flight:
//     Extend restarts its lease, Complete replaces it with the response.
//     Otherwise they return ErrLeaseLost and change nothing; except that
//     Complete repeated by T on the record T completed succeeds again,
//     changing nothing. Extend never acts on a completed record.
//   - Release deletes the claim T owns. It returns ErrLeaseLost, changing
//     nothing, only when someone else holds the key: another token's
//     claim in flight, or a completed record (whoever completed it). When
//     nothing holds the key (no record, or one whose lease or TTL may
//     have run out, T's own included) it succeeds and changes nothing,
//     so a Release repeated by T succeeds: a client library re-sends a
//     call whose reply it lost, and the repeat finds the key free.
//   - Get returns the record as it is, or none.
//   - Leases and TTLs run out only when they may have: the operation that
//     finds the record gone (a claim, a Get answering none, an
//     ErrLeaseLost to its owner) returned at least the lease (TTL) after
//     the call of the Acquire or Extend (Complete) that last set it, less
//     [DriftPPM]. The model never requires a lapse: a store may be late.
//   - A call that failed with an error other than ErrLeaseLost (Outcome
//     Unknown) is accepted whatever it answered, and takes effect where
//     it is placed; its operation returns at the end of the history
//     ([Recorder.History]), so the checker can place it after everything
//     else, which is how "it never took effect" is found. An unknown claim
//     counts as a fence handed out; its value is unknown.
//
// The model is safe for concurrent use: porcupine checks keys in parallel.
func Model() porcupine.Model {
	seed := maphash.MakeSeed()
	return porcupine.Model{
		Partition: partition,
		Init:      func() any { return state{} },
		Step: func(s, in, out any) (bool, any) {
			return step(s.(state), in.(Input), out.(Output))
		},
		Hash: func(s any) uint64 { return maphash.Comparable(seed, s.(state)) },
		DescribeOperation: func(in, out any) string {
			return DescribeOperation(in.(Input), out.(Output))
		},
		DescribeState: func(s any) string { return s.(state).String() },
	}
}

// partition splits a history by key, keeping each key's operations in
// their order.
func partition(history []porcupine.Operation) [][]porcupine.Operation {
	index := make(map[string]int)
	var parts [][]porcupine.Operation
	for _, op := range history {
		key := op.Input.(Input).Key
		i, ok := index[key]
		if !ok {
			i = len(parts)
			index[key] = i
			parts = append(parts, nil)
		}
		parts[i] = append(parts[i], op)
	}
	return parts
}

func step(s state, in Input, out Output) (bool, state) {
	s.clock = max(s.clock, in.Call)
	if out.Outcome == Unknown {
		return true, s.apply(in)
	}
	switch in.Op {
	case Acquire:
		return s.acquire(in, out)
	case Extend:
		return s.ownerCall(in, out, func(s state) state {
			s.from, s.span = max(s.from, in.Call), in.Lease
			return s
		})
	case Complete:
		if out.Outcome == OK && s.rec == Completed && s.token == in.Token {
			return true, s // repeated by the token that completed it
		}
		return s.ownerCall(in, out, func(s state) state { return s.completed(in) })
	case Release:
		return s.release(in, out)
	case Get:
		return s.get(out)
	}
	return false, s
}

// acquire checks an Acquire that answered.
func (s state) acquire(in Input, out Output) (bool, state) {
	switch {
	case out.Outcome != OK:
		return false, s // Acquire has no ErrLeaseLost to give
	case out.Fence == 0: // not claimed: the record there, unchanged
		return out.Found.State != None && s.shows(out.Found), s
	case s.rec != None && !s.lapsedBy(out.Return), out.Fence <= s.maxFence, s.late(in):
		return false, s
	}
	return true, s.claimed(in, out.Fence)
}

// ownerCall checks an Extend or Complete that answered: done changes the
// state when the call succeeded.
func (s state) ownerCall(in Input, out Output, done func(state) state) (bool, state) {
	owns := s.rec == InFlight && s.token == in.Token
	switch {
	case out.Outcome == OK:
		if !owns {
			return false, s
		}
		return true, done(s)
	case out.Outcome == LeaseLost && (owns || (in.Op == Complete && s.rec == Completed && s.token == in.Token)):
		// T owned the claim (or completed the record): only a lapse
		// explains the refusal.
		if !s.lapsedBy(out.Return) {
			return false, s
		}
		return true, s.gone()
	case out.Outcome == LeaseLost:
		return true, s
	}
	return false, s
}

// release checks a Release that answered.
func (s state) release(in Input, out Output) (bool, state) {
	owns := s.rec == InFlight && s.token == in.Token
	switch out.Outcome {
	case OK:
		// T's claim, lapsed or not, or a key that nothing holds (any more):
		// free after the call.
		if owns || s.lapsedBy(out.Return) {
			return true, s.gone()
		}
		return false, s
	case LeaseLost:
		// Someone else holds the key. Never T's own claim, also when its
		// lease lapsed (then nothing holds the key: the call succeeds); a
		// record of another that may have run out may still be there.
		return s.rec != None && !owns, s
	}
	return false, s
}

// get checks a Get that answered.
func (s state) get(out Output) (bool, state) {
	switch {
	case out.Outcome != OK:
		return false, s
	case out.Found.State != None:
		return s.shows(out.Found), s
	case s.rec == None:
		return true, s
	case s.lapsedBy(out.Return):
		return true, s.gone()
	}
	return false, s
}

// apply takes the effect of a call whose outcome is unknown, as if it ran
// now: what it does when the record is as the state says. (Had the record
// lapsed first, the call would change nothing, which the checker finds by
// placing it at the end instead.)
func (s state) apply(in Input) state {
	owns := s.rec == InFlight && s.token == in.Token
	switch in.Op {
	case Acquire:
		if s.late(in) {
			return s
		}
		if s.rec != None {
			// The record must have run out by the deadline, when the
			// claim could land at the latest.
			if in.Deadline == 0 || !s.lapsedBy(in.Deadline+int64(DeadlineSlack)) {
				return s
			}
		}
		return s.claimed(in, 0)
	case Extend:
		if owns {
			s.from, s.span = max(s.from, in.Call), in.Lease
		}
	case Complete:
		if owns {
			return s.completed(in)
		}
	case Release:
		if owns {
			return s.gone()
		}
	}
	return s
}

// shows reports whether r is the record the state holds.
func (s state) shows(r Record) bool {
	if r.State != s.rec || r.Fingerprint != s.fp {
		return false
	}
	switch s.rec {
	case InFlight:
		return r.Token == s.token
	case Completed:
		return r.Response == s.resp
	}
	return false
}

// lapsedBy reports whether the record's lease or TTL may have run out, by
// the store's clock, before the client's clock read t.
func (s state) lapsedBy(t int64) bool {
	if s.rec == None {
		return true
	}
	return t >= s.from+int64(s.span)-int64(s.span)/1e6*DriftPPM
}

// late reports whether a claim by in would land after its deadline: the
// operations before it took effect after their calls, so it cannot have
// taken effect before the latest of them.
func (s state) late(in Input) bool {
	return in.Op == Acquire && in.Deadline != 0 && s.clock > in.Deadline+int64(DeadlineSlack)
}

// claimed returns the state after in claimed the key with fence (0:
// unknown, but greater than every fence before it).
func (s state) claimed(in Input, fence uint64) state {
	maxFence := max(s.maxFence, fence)
	if fence == 0 {
		maxFence = s.maxFence + 1
	}
	return state{clock: s.clock, rec: InFlight, token: in.Token, fp: in.Fingerprint, fence: fence,
		from: in.Call, span: in.Lease, maxFence: maxFence}
}

// completed returns the state after in completed the claim in flight.
func (s state) completed(in Input) state {
	s.rec, s.fp, s.resp = Completed, in.Fingerprint, in.Response
	s.from, s.span = in.Call, in.TTL
	return s
}

// gone returns the state without a record.
func (s state) gone() state {
	return state{clock: s.clock, maxFence: s.maxFence}
}

func (s state) String() string {
	var b strings.Builder
	switch s.rec {
	case None:
		b.WriteString("no record")
	case InFlight:
		fmt.Fprintf(&b, "in flight: owner %s, fp %q, fence %s, lease %v from %s",
			short(s.token), s.fp, fenceString(s.fence), s.span, at(s.from))
	case Completed:
		fmt.Fprintf(&b, "completed by %s: %d %q, fp %q, TTL %v from %s",
			short(s.token), s.resp.Status, s.resp.Body, s.fp, s.span, at(s.from))
	}
	fmt.Fprintf(&b, "; greatest fence %d", s.maxFence)
	return b.String()
}

// DescribeOperation describes a recorded operation in one line, as the
// visualization shows it.
func DescribeOperation(in Input, out Output) string {
	var call string
	switch in.Op {
	case Acquire:
		call = fmt.Sprintf("Acquire(%s, fp %q, lease %v)", short(in.Token), in.Fingerprint, in.Lease)
	case Extend:
		call = fmt.Sprintf("Extend(%s, lease %v)", short(in.Token), in.Lease)
	case Complete:
		call = fmt.Sprintf("Complete(%s, %d %q, TTL %v)", short(in.Token), in.Response.Status, in.Response.Body, in.TTL)
	case Release:
		call = fmt.Sprintf("Release(%s)", short(in.Token))
	case Get:
		call = "Get()"
	default:
		call = in.Op.String()
	}
	var answer string
	switch {
	case out.Outcome != OK:
		answer = out.Outcome.String()
	case in.Op == Acquire && out.Fence != 0:
		answer = fmt.Sprintf("claimed, fence %d", out.Fence)
	case in.Op == Acquire || in.Op == Get:
		answer = out.Found.String()
	default:
		answer = "ok"
	}
	return call + " → " + answer
}

func (r Record) String() string {
	switch r.State {
	case None:
		return "no record"
	case InFlight:
		return fmt.Sprintf("in flight, owner %s, fp %q", short(r.Token), r.Fingerprint)
	case Completed:
		return fmt.Sprintf("completed %d %q, fp %q", r.Response.Status, r.Response.Body, r.Fingerprint)
	case Suspended:
		return fmt.Sprintf("suspended, fp %q", r.Fingerprint)
	}
	return fmt.Sprintf("RecordState(%d)", uint8(r.State))
}

// short abbreviates a token: the first 6 characters name it in a history.
func short(token string) string {
	if len(token) > 6 {
		return token[:6]
	}
	return token
}

func fenceString(f uint64) string {
	if f == 0 {
		return "unknown"
	}
	return fmt.Sprint(f)
}

// at formats a time on the history's clock.
func at(t int64) string {
	return time.Duration(t).Round(time.Microsecond).String()
}

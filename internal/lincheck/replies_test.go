package lincheck_test

import (
	"strings"
	"testing"
	"time"

	"github.com/seed70ea8305/idempotency/internal/lincheck"
)

// TestCheckReplies: the end-to-end promise holds for replays of one
// execution, and each way of breaking it is reported with the clients
// and executions involved.
func TestCheckReplies(t *testing.T) {
	ms := func(n int) time.Duration { return time.Duration(n) * time.Millisecond }
	exec := func(n, at int) lincheck.Execution {
		return lincheck.Execution{Key: "k", N: n, Started: ms(at), Status: 201, Body: "run " + string(rune('0'+n))}
	}
	got := func(client, sent, received int, body string, replayed bool) lincheck.Exchange {
		return lincheck.Exchange{Client: client, Key: "k", Sent: ms(sent), Received: ms(received), Status: 201, Body: body, Replayed: replayed}
	}
	busy := lincheck.Exchange{Client: 2, Key: "k", Sent: ms(1), Received: ms(2), Status: 409}
	tests := []struct {
		name  string
		execs []lincheck.Execution
		got   []lincheck.Exchange
		want  []string // substrings of the violations, one each
	}{
		{"one execution, replayed", []lincheck.Execution{exec(1, 0)},
			[]lincheck.Exchange{got(0, 0, 5, "run 1", false), busy, got(1, 6, 7, "run 1", true)}, nil},
		{"a failed execution, then one that succeeded", []lincheck.Execution{exec(1, 0), exec(2, 10)},
			[]lincheck.Exchange{{Client: 0, Key: "k", Sent: 0, Received: ms(5), Status: 503}, got(0, 9, 15, "run 2", false), got(1, 16, 17, "run 2", true)}, nil},
		{"a success contradicted by a later replay", []lincheck.Execution{exec(1, 0), exec(2, 10)},
			[]lincheck.Exchange{got(0, 0, 5, "run 1", false), got(1, 9, 15, "run 2", false)},
			[]string{`client 0 got 201 "run 1" (execution 1`, `the handler ran 2 times: execution 2 started at 10ms although client 0 had got execution 1's 201 "run 1" (received 5ms, before it started)`}},
		{"an answer no execution gave", []lincheck.Execution{exec(1, 0)},
			[]lincheck.Exchange{got(0, 0, 5, "run 1", false), got(1, 6, 7, "forged", true)},
			[]string{`later client 1 got 201 "forged" (from no execution`, `client 1 got 201 "forged" at 7ms, which no execution answered`}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			violations := lincheck.CheckReplies(tt.execs, tt.got)
			if len(violations) != len(tt.want) {
				t.Fatalf("%d violations, want %d:\n%s", len(violations), len(tt.want), strings.Join(violations, "\n"))
			}
			for i, want := range tt.want {
				if !strings.Contains(violations[i], want) {
					t.Errorf("violation %d is\n%s\nwant it to contain\n%s", i, violations[i], want)
				}
			}
		})
	}
}

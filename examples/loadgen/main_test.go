package main

import (
	"bytes"
	"context"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"go.uber.org/goleak"
)

// TestMain fails the run if the server, the workers or the client's
// connections outlive run.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

var countRE = regexp.MustCompile(`(\w+)=(\d+)`)

// counts parses the name=value pairs loadgen prints.
func counts(t *testing.T, out string) map[string]int {
	t.Helper()
	m := map[string]int{}
	for _, match := range countRE.FindAllStringSubmatch(out, -1) {
		n, err := strconv.Atoi(match[2])
		require.NoError(t, err)
		m[match[1]] = n
	}
	return m
}

func TestRunExactlyOnce(t *testing.T) {
	for _, tc := range []struct {
		name string
		args []string
		want int
	}{
		{"default faults", []string{"-requests", "80", "-concurrency", "4", "-seed", "3"}, 80},
		{"many faults", []string{"-requests", "60", "-concurrency", "6", "-fault-rate", "0.6", "-seed", "11"}, 60},
		{"no faults", []string{"-requests", "20", "-fault-rate", "0"}, 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var stdout, stderr bytes.Buffer
			ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
			defer cancel()
			err := run(ctx, tc.args, &stdout, &stderr)
			out := stdout.String()
			require.NoError(t, err, "stdout:\n%s\nstderr:\n%s", out, stderr.String())
			c := counts(t, out)
			requests := c["requests"]
			assert.Equal(t, tc.want, requests)
			assert.Equal(t, requests, c["succeeded"])
			assert.Zero(t, c["failed"])
			assert.Equal(t, requests, c["executions"], "executions == logical requests")
			assert.GreaterOrEqual(t, c["attempts"], requests)
			assert.GreaterOrEqual(t, c["server_requests"], c["attempts"])
			assert.LessOrEqual(t, c["replays"], c["drop_after"], "only a dropped answer leads to a replay")
			assert.Contains(t, out, "exactly-once: ok")
			if tc.name == "no faults" {
				assert.Equal(t, requests, c["attempts"])
				assert.Zero(t, c["replays"])
			} else {
				assert.Greater(t, c["attempts"], requests, "faults cost retries")
			}
		})
	}
}

func TestFlags(t *testing.T) {
	for _, args := range [][]string{
		{"-requests", "0"},
		{"-concurrency", "0"},
		{"-fault-rate", "1"},
		{"-duration", "0s"},
		{"-nope"},
	} {
		var stdout, stderr bytes.Buffer
		err := run(context.Background(), args, &stdout, &stderr)
		assert.Error(t, err, "%v", args)
		assert.Empty(t, stdout.String())
	}
}

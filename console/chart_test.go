package console

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"

	"github.com/seed70ea8305/idempotency"
)

// TestActivity: outcomes and worker attempts are counted in their minute,
// and a minute older than the chart's day no longer shows.
func TestActivity(t *testing.T) {
	now := time.Date(2026, 12, 3, 10, 30, 15, 0, time.UTC)
	a := NewActivity()
	a.now = func() time.Time { return now }
	ctx := context.Background()
	a.ObserveRequest(ctx, idempotency.Report{Outcome: idempotency.OutcomeExecuted})
	a.ObserveRequest(ctx, idempotency.Report{Outcome: idempotency.OutcomeExecuted})
	a.ObserveRequest(ctx, idempotency.Report{Outcome: idempotency.OutcomeReplayed})
	fn := a.Worker(func(_ context.Context, ev idempotency.WebhookEvent) error {
		if ev.ID == "bad" {
			return errors.New("boom")
		}
		return nil
	})
	assert.NoError(t, fn(ctx, idempotency.WebhookEvent{ID: "good"}))
	assert.Error(t, fn(ctx, idempotency.WebhookEvent{ID: "bad"}))

	series := a.requests(now)
	assert.Len(t, series, 2)
	assert.Equal(t, "executed", series[0].Name)
	assert.Equal(t, int64(2), series[0].Counts[chartMinutes-1], "the current minute is the last")
	assert.Equal(t, "replayed", series[1].Name)
	ok, failed := a.worker(now)
	assert.Equal(t, int64(1), ok[chartMinutes-1])
	assert.Equal(t, int64(1), failed[chartMinutes-1])

	later := now.Add(time.Hour)
	assert.Equal(t, int64(2), a.requests(later)[0].Counts[chartMinutes-1-60], "an hour on, the same minute an hour back")
	assert.Empty(t, a.requests(now.Add(24*time.Hour)), "a day on, gone")
}

// TestChart: the lines share one scale, the ticks fall on the hour, and
// an empty day says so.
func TestChart(t *testing.T) {
	now := time.Date(2026, 12, 3, 10, 30, 0, 0, time.UTC)
	counts := make([]int64, chartMinutes)
	counts[chartMinutes-1] = 7
	c := newChart("t", now, []series{{Name: "a", Counts: counts}, {Name: "b", Counts: make([]int64, chartMinutes)}})
	assert.False(t, c.Empty)
	assert.Equal(t, "10", c.YTicks[2].Label, "7 rounds up to 10")
	assert.Equal(t, int64(7), c.Lines[0].Total)
	assert.Equal(t, int64(7), c.Lines[0].Peak)
	assert.Equal(t, 3, strings.Count(c.Lines[0].Points, " ")+1, "a flat run needs only its ends, then the peak")
	for _, tick := range c.XTicks {
		assert.True(t, strings.HasSuffix(tick.Label, ":00"), tick.Label)
	}
	assert.True(t, newChart("t", now, nil).Empty)
	for n, want := range map[int64]int64{1: 1, 2: 2, 3: 5, 7: 10, 11: 20, 999: 1000, 1001: 2000} {
		assert.Equal(t, want, niceCeil(n), n)
	}
}

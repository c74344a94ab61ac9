package console

import (
	"context"
	"math"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/seed70ea8305/idempotency"
)

// chartMinutes is how many minutes a chart spans: the last 24 hours.
const chartMinutes = 24 * 60

// Activity counts, per minute over the last 24 hours, the request outcomes
// that the middleware reports and the attempts of an inbox worker, as this
// process sees them, for the console's charts ([Options].Activity). Give
// [Activity.ObserveRequest] to [idempotency.Options].Observer (or call it
// from your own observer) and wrap the worker's function with
// [Activity.Worker]. It is safe for concurrent use, and keeps a fixed
// 24 hours of counts whatever the traffic; its zero value is not usable:
// create it with [NewActivity].
type Activity struct {
	now func() time.Time

	mu       sync.Mutex
	outcomes map[idempotency.Outcome]*ring
	workerOK ring
	workerKO ring
}

// NewActivity returns an empty [Activity].
func NewActivity() *Activity {
	return &Activity{now: time.Now, outcomes: map[idempotency.Outcome]*ring{}}
}

// ObserveRequest counts the report's outcome in its minute. Its signature
// is [idempotency.Options].Observer's.
func (a *Activity) ObserveRequest(_ context.Context, r idempotency.Report) {
	minute := a.now().Unix() / 60
	a.mu.Lock()
	defer a.mu.Unlock()
	rg := a.outcomes[r.Outcome]
	if rg == nil {
		rg = &ring{}
		a.outcomes[r.Outcome] = rg
	}
	rg.add(minute)
}

// Worker wraps the function of an inbox worker so that each attempt is
// counted in its minute: succeeded or failed (an error or a panic, which
// it lets continue).
func (a *Activity) Worker(fn func(ctx context.Context, ev idempotency.WebhookEvent) error) func(ctx context.Context, ev idempotency.WebhookEvent) error {
	return func(ctx context.Context, ev idempotency.WebhookEvent) (err error) {
		failed := true
		defer func() {
			minute := a.now().Unix() / 60
			a.mu.Lock()
			defer a.mu.Unlock()
			if failed {
				a.workerKO.add(minute)
			} else {
				a.workerOK.add(minute)
			}
		}()
		err = fn(ctx, ev)
		failed = err != nil
		return err
	}
}

// worker returns the attempts that succeeded and failed in each minute of
// the day up to now's, oldest first.
func (a *Activity) worker(now time.Time) (ok, failed []int64) {
	last := now.Unix() / 60
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.workerOK.series(last), a.workerKO.series(last)
}

// outcomeOrder is the order, and the colour class, of the outcomes in the
// requests chart; outcomes not listed follow in the "other" colour.
var outcomeOrder = []struct {
	outcome idempotency.Outcome
	class   string
}{
	{idempotency.OutcomeExecuted, "s-ok"},
	{idempotency.OutcomeReplayed, "s-replay"},
	{idempotency.OutcomeInFlight, "s-wait"},
	{idempotency.OutcomeMismatch, "s-warn"},
	{idempotency.OutcomeRejected, "s-warn"},
	{idempotency.OutcomeReleased, "s-fail"},
	{idempotency.OutcomeStoreError, "s-fail"},
	{idempotency.OutcomeLeaseLost, "s-fail"},
	{idempotency.OutcomeUnprotected, "s-fail"},
	{idempotency.OutcomeUnreadable, "s-fail"},
}

// requests returns a series per outcome seen in the last day.
func (a *Activity) requests(now time.Time) []series {
	last := now.Unix() / 60
	a.mu.Lock()
	defer a.mu.Unlock()
	var out []series
	seen := map[idempotency.Outcome]bool{}
	for _, o := range outcomeOrder {
		seen[o.outcome] = true
		if rg := a.outcomes[o.outcome]; rg != nil && rg.any(last) {
			out = append(out, series{Name: string(o.outcome), Class: o.class, Counts: rg.series(last)})
		}
	}
	for o, rg := range a.outcomes {
		if !seen[o] && rg.any(last) {
			out = append(out, series{Name: string(o), Class: "s-other", Counts: rg.series(last)})
		}
	}
	return out
}

// ring holds a count per minute for the last chartMinutes minutes: slot
// minute%chartMinutes, valid while minutes[slot] is that minute.
type ring struct {
	minutes [chartMinutes]int64
	counts  [chartMinutes]int64
}

func (r *ring) add(minute int64) {
	i := minute % chartMinutes
	if r.minutes[i] != minute {
		r.minutes[i], r.counts[i] = minute, 0
	}
	r.counts[i]++
}

// series returns the counts of the chartMinutes minutes up to last,
// oldest first.
func (r *ring) series(last int64) []int64 {
	out := make([]int64, chartMinutes)
	for k := range out {
		m := last - chartMinutes + 1 + int64(k)
		if i := m % chartMinutes; m >= 0 && r.minutes[i] == m {
			out[k] = r.counts[i]
		}
	}
	return out
}

func (r *ring) any(last int64) bool {
	for i, m := range r.minutes {
		if m > last-chartMinutes && m <= last && r.counts[i] > 0 {
			return true
		}
	}
	return false
}

// series is one line of a chart: a count per minute, oldest first.
type series struct {
	Name   string
	Class  string // its colour, in console.css
	Counts []int64
}

// Chart geometry, in SVG user units.
const (
	chartW, chartH         = 960, 200
	chartLeft, chartTop    = 48, 10
	chartPlotW, chartPlotH = chartW - chartLeft - 10, chartH - chartTop - 30
)

// chart is what chart.html draws: a title, lines with their legends, the
// axes' ticks.
type chart struct {
	Title         string
	Width, Height int
	PlotX, PlotY  int
	PlotW, PlotH  int
	Lines         []chartLine
	XTicks        []chartTick
	YTicks        []chartTick
	Empty         bool // nothing counted in the last day
}

type chartLine struct {
	Name, Class string
	Points      string // an SVG polyline's points
	Total       int64
	Peak        int64
}

type chartTick struct {
	Pos   int // x (XTicks) or y (YTicks)
	Label string
}

// newChart lays the series out on a common scale: x the minutes of the
// last day, y from 0 to the largest count.
func newChart(title string, now time.Time, ss []series) chart {
	c := chart{Title: title, Width: chartW, Height: chartH, PlotX: chartLeft, PlotY: chartTop, PlotW: chartPlotW, PlotH: chartPlotH}
	var peak int64
	for _, s := range ss {
		for _, n := range s.Counts {
			peak = max(peak, n)
		}
	}
	c.Empty = peak == 0
	yMax := niceCeil(max(peak, 1))
	y := func(n int64) float64 { return chartTop + chartPlotH - float64(n)*chartPlotH/float64(yMax) }
	x := func(i int) float64 { return chartLeft + float64(i)*chartPlotW/float64(chartMinutes-1) }
	for _, s := range ss {
		l := chartLine{Name: s.Name, Class: s.Class}
		var b strings.Builder
		for i, n := range s.Counts {
			l.Total += n
			l.Peak = max(l.Peak, n)
			// Runs of equal counts need only their ends.
			if i > 0 && i < len(s.Counts)-1 && s.Counts[i-1] == n && s.Counts[i+1] == n {
				continue
			}
			if b.Len() > 0 {
				b.WriteByte(' ')
			}
			b.WriteString(strconv.FormatFloat(x(i), 'f', 1, 64))
			b.WriteByte(',')
			b.WriteString(strconv.FormatFloat(y(n), 'f', 1, 64))
		}
		l.Points = b.String()
		c.Lines = append(c.Lines, l)
	}
	for _, v := range []int64{0, yMax / 2, yMax} {
		c.YTicks = append(c.YTicks, chartTick{Pos: int(y(v)), Label: strconv.FormatInt(v, 10)})
	}
	// A tick every 3 hours, on the hour (UTC), labelled with the hour.
	first := now.Unix()/60 - chartMinutes + 1
	for i := range chartMinutes {
		m := first + int64(i)
		if m%(3*60) == 0 {
			c.XTicks = append(c.XTicks, chartTick{Pos: int(x(i)), Label: time.Unix(m*60, 0).UTC().Format("15:04")})
		}
	}
	return c
}

// niceCeil rounds n up to 1, 2 or 5 times a power of ten, so the axis
// reads well.
func niceCeil(n int64) int64 {
	for p := int64(1); p <= math.MaxInt64/10; p *= 10 {
		for _, m := range []int64{1, 2, 5} {
			if m*p >= n {
				return m * p
			}
		}
	}
	return n
}

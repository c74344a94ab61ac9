package main

import (
	"context"
	"fmt"
	"io"
	"math"
	"os"
	"runtime"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"
)

// minSamples is the fewest requests a step must send for its p99 to say
// anything.
const minSamples = 100

// saturation is one server's search for its highest passing rate.
type saturation struct {
	server   string
	best     int  // highest rate that passed; 0 if none
	bounded  bool // a higher rate failed (else the search reached -max-rate)
	at       row  // the best rate's figures
	steps    []string
	failures []string // why steps failed, a few
}

// saturate finds, for every server, the highest constant rate of first
// requests that it answers entirely with 201 and a p99 under cfg.p99,
// and prints it beside the bare handler's. The servers' searches advance
// in turns, one step each, so that a busy spell of a shared machine falls
// on all of them rather than on one server's search. It reports false
// when a step ran the handler other than once per 201.
func saturate(ctx context.Context, cfg config, servers []server, notes []string, runID string, out io.Writer) (bool, error) {
	fmt.Fprintf(out, "load: %s\n\n", loadavg())
	// A warm-up attack per server first: pools fill and statements get
	// prepared outside the measured steps.
	for _, srv := range servers {
		c := cfg
		c.duration = min(cfg.duration, time.Second)
		if _, _, err := runScenario(ctx, c, srv, "unique", runID+"-warm"); err != nil {
			return false, fmt.Errorf("%s: warm-up: %w", srv.name, err)
		}
	}
	searches := make([]*search, len(servers))
	for i, srv := range servers {
		searches[i] = &search{cfg: cfg, srv: srv, res: saturation{server: srv.name}, next: cfg.rate, good: true}
	}
	for step := 0; ; step++ {
		active := 0
		for _, s := range searches {
			if s.next == 0 {
				continue
			}
			active++
			if err := s.step(ctx, runID+"-"+strconv.Itoa(step)); err != nil {
				return false, fmt.Errorf("%s: %w", s.srv.name, err)
			}
		}
		if active == 0 {
			break
		}
	}
	ok := true
	var bare float64
	for _, s := range searches {
		ok = ok && s.good
		fmt.Fprintf(out, "%-8s steps: %s\n", s.srv.name, strings.Join(s.res.steps, " "))
		if s.srv.name == "bare" {
			bare = float64(s.res.best)
		}
	}
	fmt.Fprintln(out)
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "server\thighest rate with p99 < %v\t× bare\tp50 there\tp99 there\n", cfg.p99)
	for _, s := range searches {
		r := s.res
		rate := strconv.Itoa(r.best) + "/s"
		switch {
		case r.best == 0:
			rate = "< " + strconv.Itoa(s.hi) + "/s"
		case !r.bounded:
			rate = "≥ " + rate
		}
		ratio := "—"
		if bare > 0 && r.best > 0 {
			ratio = strconv.FormatFloat(float64(r.best)/bare, 'f', 2, 64)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.server, rate, ratio, round(r.at.p50), round(r.at.p99))
	}
	_ = tw.Flush()
	for _, s := range searches {
		if len(s.res.failures) > 0 {
			fmt.Fprintf(out, "failed steps of %s: %s\n", s.srv.name, strings.Join(s.res.failures, "; "))
		}
	}
	for _, n := range notes {
		fmt.Fprintln(out, "note:", n)
	}
	fmt.Fprintf(out, "load at the end: %s\n", loadavg())
	return ok, nil
}

// search is one server's search: it doubles the rate from cfg.rate until
// a step fails (halves it while the first fails, as long as a step still
// sends minSamples requests), then bisects to within 5 %.
type search struct {
	cfg    config
	srv    server
	res    saturation
	lo, hi int  // highest rate passed, lowest failed; 0: none yet
	next   int  // the rate of the next step; 0: done
	good   bool // no step's execution count was wrong
	steps  int
}

// step runs the next rate and chooses the one after.
func (s *search) step(ctx context.Context, tag string) error {
	rate := s.next
	passed, err := s.try(ctx, rate, tag)
	if err != nil {
		return err
	}
	if passed {
		s.lo = max(s.lo, rate)
	} else if s.hi == 0 || rate < s.hi {
		s.hi = rate
	}
	s.next = nextRate(s.lo, s.hi, s.cfg.maxRate, int(math.Ceil(minSamples/s.cfg.duration.Seconds())))
	s.res.bounded = s.hi > 0
	return nil
}

// nextRate is the search's next rate after the highest rate that passed
// (lo) and the lowest that failed (hi), 0 meaning none yet; it returns 0
// when the search is done: it doubles up to maxRate, halves down to
// minRate, then bisects to within 5 %.
func nextRate(lo, hi, maxRate, minRate int) int {
	switch {
	case hi == 0 && lo*2 <= maxRate:
		return lo * 2
	case hi == 0:
		return 0
	case lo == 0 && hi/2 >= minRate && hi > 1:
		return hi / 2
	case lo == 0 || hi-lo <= lo/20:
		return 0
	default:
		return (lo + hi) / 2
	}
}

// try attacks at rate; a failing step gets a second try before it
// counts, so that one stall of a shared machine does not set the figure.
func (s *search) try(ctx context.Context, rate int, tag string) (bool, error) {
	for attempt := range 2 {
		c := s.cfg
		c.rate = rate
		s.steps++
		r, ck, err := runScenario(ctx, c, s.srv, "unique", tag+"-"+s.srv.name+"-"+strconv.Itoa(s.steps))
		if err != nil {
			return false, err
		}
		s.good = s.good && ck.ok
		why := ""
		switch {
		case !ck.ok:
			why = ck.detail
		case r.success < 1:
			why = fmt.Sprintf("%.2f%% answered 201 (%s)", 100*r.success, formatCodes(r.codes))
		case r.p99 >= s.cfg.p99:
			why = fmt.Sprintf("p99 %v", round(r.p99))
		}
		if why == "" {
			s.res.steps = append(s.res.steps, strconv.Itoa(rate)+"✓")
			if rate > s.res.best {
				s.res.best, s.res.at = rate, r
			}
			return true, nil
		}
		s.res.steps = append(s.res.steps, strconv.Itoa(rate)+"✗")
		if len(s.res.failures) < 3 {
			s.res.failures = append(s.res.failures, fmt.Sprintf("%d/s: %s", rate, why))
		}
		if attempt == 1 {
			return false, nil
		}
	}
	return false, nil
}

// loadavg is the machine's load, printed beside the figures.
func loadavg() string {
	b, err := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if err != nil || len(f) < 3 {
		return fmt.Sprintf("unknown, %d CPUs", runtime.NumCPU())
	}
	return fmt.Sprintf("%s %s %s (1/5/15 min) on %d CPUs", f[0], f[1], f[2], runtime.NumCPU())
}

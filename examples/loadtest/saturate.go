package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"runtime"
	"strconv"
	"strings"
	"text/tabwriter"
)

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
// and prints it beside the bare handler's. It reports false when a step
// ran the handler other than once per 201.
func saturate(ctx context.Context, cfg config, servers []server, notes []string, runID string, out io.Writer) (bool, error) {
	fmt.Fprintf(out, "load: %s\n\n", loadavg())
	ok := true
	var results []saturation
	for _, srv := range servers {
		res, good, err := searchRate(ctx, cfg, srv, runID)
		if err != nil {
			return false, fmt.Errorf("%s: %w", srv.name, err)
		}
		ok = ok && good
		results = append(results, res)
		fmt.Fprintf(out, "%-8s steps: %s\n", srv.name, strings.Join(res.steps, " "))
	}
	fmt.Fprintln(out)
	var bare float64
	for _, r := range results {
		if r.server == "bare" {
			bare = float64(r.best)
		}
	}
	tw := tabwriter.NewWriter(out, 0, 0, 2, ' ', 0)
	fmt.Fprintf(tw, "server\thighest rate with p99 < %v\t× bare\tp50 there\tp99 there\n", cfg.p99)
	for _, r := range results {
		rate := strconv.Itoa(r.best) + "/s"
		if !r.bounded {
			rate = "≥ " + rate
		}
		ratio := "—"
		if bare > 0 {
			ratio = strconv.FormatFloat(float64(r.best)/bare, 'f', 2, 64)
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", r.server, rate, ratio, round(r.at.p50), round(r.at.p99))
	}
	_ = tw.Flush()
	for _, r := range results {
		if len(r.failures) > 0 {
			fmt.Fprintf(out, "failed steps of %s: %s\n", r.server, strings.Join(r.failures, "; "))
		}
	}
	for _, n := range notes {
		fmt.Fprintln(out, "note:", n)
	}
	fmt.Fprintf(out, "load at the end: %s\n", loadavg())
	return ok, nil
}

// searchRate doubles the rate from cfg.rate until a step fails (halves
// it while the first fails), then bisects to within 5 %.
func searchRate(ctx context.Context, cfg config, srv server, runID string) (saturation, bool, error) {
	res := saturation{server: srv.name}
	good := true
	step := 0
	pass := func(rate int) (bool, error) {
		// A failing step gets a second try before it counts: one
		// stall of a shared machine should not set the figure.
		for try := range 2 {
			c := cfg
			c.rate = rate
			step++
			r, ck, err := runScenario(ctx, c, srv, "unique", runID+"-s"+strconv.Itoa(step))
			if err != nil {
				return false, err
			}
			good = good && ck.ok
			why := ""
			switch {
			case !ck.ok:
				why = ck.detail
			case r.success < 1:
				why = fmt.Sprintf("%.2f%% answered 201 (%s)", 100*r.success, formatCodes(r.codes))
			case r.p99 >= cfg.p99:
				why = fmt.Sprintf("p99 %v", round(r.p99))
			}
			if why == "" {
				res.steps = append(res.steps, strconv.Itoa(rate)+"✓")
				if rate > res.best {
					res.best, res.at = rate, r
				}
				return true, nil
			}
			res.steps = append(res.steps, strconv.Itoa(rate)+"✗")
			if len(res.failures) < 3 {
				res.failures = append(res.failures, fmt.Sprintf("%d/s: %s", rate, why))
			}
			if try == 1 {
				return false, nil
			}
		}
		return false, nil
	}
	lo, hi := 0, 0
	for rate := cfg.rate; hi == 0 && rate <= cfg.maxRate; rate *= 2 {
		ok, err := pass(rate)
		if err != nil {
			return res, good, err
		}
		if !ok {
			hi = rate
		} else {
			lo = rate
		}
	}
	for lo == 0 && hi > 1 { // even the first rate failed: go down
		ok, err := pass(hi / 2)
		if err != nil {
			return res, good, err
		}
		if ok {
			lo = hi / 2
		} else {
			hi /= 2
		}
	}
	for lo > 0 && hi > 0 && hi-lo > lo/20 {
		mid := (lo + hi) / 2
		ok, err := pass(mid)
		if err != nil {
			return res, good, err
		}
		if ok {
			lo = mid
		} else {
			hi = mid
		}
	}
	res.bounded = hi > 0
	return res, good, nil
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

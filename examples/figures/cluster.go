package main

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"

	"github.com/seed70ea8305/idempotency"
)

// shardRun is a closed-loop run of first requests through the middleware
// on a Redis deployment of one or more shards.
type shardRun struct {
	shards   int
	requests int64
	elapsed  time.Duration
	// per shard: keys added, CPU (µs) and commands over the run
	keys, cpu, calls []float64
	// per shard: CPU share when idle (taken off cpu)
	idle []float64
}

// busiest is the largest share of one core that a shard's requests used.
func (s shardRun) busiest() float64 {
	var b float64
	for _, c := range s.cpu {
		b = max(b, c/float64(s.elapsed.Microseconds()))
	}
	return b
}

func (s shardRun) rate() float64 { return float64(s.requests) / s.elapsed.Seconds() }

// cpuPerRequest is the Redis CPU of every shard together per request, µs.
func (s shardRun) cpuPerRequest() float64 {
	var sum float64
	for _, c := range s.cpu {
		sum += c
	}
	return sum / float64(s.requests)
}

// spread is the largest and the smallest shard's share of the keys,
// against an even share (1 = perfectly even).
func (s shardRun) spread() (lo, hi float64) {
	var sum float64
	for _, k := range s.keys {
		sum += k
	}
	even := sum / float64(len(s.keys))
	lo, hi = s.keys[0]/even, s.keys[0]/even
	for _, k := range s.keys[1:] {
		lo, hi = min(lo, k/even), max(hi, k/even)
	}
	return lo, hi
}

// loadShards sends first requests with new keys from workers goroutines
// for d through a middleware on client, and reads each node's counters
// before and after.
func loadShards(ctx context.Context, client redis.UniversalClient, nodes []*redis.Client, workers int, d time.Duration) (shardRun, error) {
	run := shardRun{shards: len(nodes)}
	store, err := idempotency.NewRedisStore(client, idempotency.RedisOptions{Prefix: "figures:"})
	if err != nil {
		return run, err
	}
	mw, err := idempotency.New(store, idempotency.Options{})
	if err != nil {
		return run, err
	}
	h := mw.Handler(app)
	for i := range 20 { // connections to every node, scripts loaded
		if err := serve(h, "warm-"+strconv.Itoa(i)); err != nil {
			return run, err
		}
	}
	// A shard spends CPU when idle too (serverCron, the cluster bus):
	// measured over a quiet while and taken off, so that what remains is
	// the requests'.
	idle := min(d, 2*time.Second)
	quiet := make([]redisSnapshot, len(nodes))
	for i, n := range nodes {
		if quiet[i], err = snapshotRedis(ctx, n); err != nil {
			return run, err
		}
	}
	quietStart := time.Now()
	time.Sleep(idle) // a measurement window, not a synchronisation
	before := make([]redisSnapshot, len(nodes))
	for i, n := range nodes {
		if before[i], err = snapshotRedis(ctx, n); err != nil {
			return run, err
		}
	}
	quietElapsed := time.Since(quietStart)
	var (
		next     atomic.Int64
		wg       sync.WaitGroup
		firstErr atomic.Pointer[error]
	)
	tag := strconv.FormatInt(time.Now().UnixNano(), 36) + "-"
	stop := time.Now().Add(d)
	start := time.Now()
	for range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Now().Before(stop) && ctx.Err() == nil {
				if err := serve(h, tag+strconv.FormatInt(next.Add(1), 10)); err != nil {
					firstErr.CompareAndSwap(nil, &err)
					return
				}
			}
		}()
	}
	wg.Wait()
	run.elapsed = time.Since(start)
	if p := firstErr.Load(); p != nil {
		return run, *p
	}
	run.requests = next.Load()
	for i, n := range nodes {
		after, err := snapshotRedis(ctx, n)
		if err != nil {
			return run, err
		}
		run.keys = append(run.keys, after.keys-before[i].keys)
		idleRate := (before[i].cpu - quiet[i].cpu) / float64(quietElapsed.Microseconds())
		run.cpu = append(run.cpu, max(0, after.cpu-before[i].cpu-idleRate*float64(run.elapsed.Microseconds())))
		run.idle = append(run.idle, idleRate)
		run.calls = append(run.calls, after.calls-before[i].calls)
	}
	return run, nil
}

// startCluster runs scripts/cluster.sh and returns the nodes' addresses
// and a function that stops them.
func startCluster(ctx context.Context, root, bin string, shards int) ([]string, func(), error) {
	dir, err := os.MkdirTemp("", "figures-cluster-")
	if err != nil {
		return nil, nil, err
	}
	script := filepath.Join(root, "scripts", "cluster.sh")
	cmd := exec.CommandContext(ctx, "bash", script, "start", strconv.Itoa(shards), dir)
	cmd.Env = append(os.Environ(), "REDIS_SERVER="+bin)
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	stop := func() {
		_ = exec.Command("bash", script, "stop", dir).Run()
		_ = os.RemoveAll(dir)
	}
	if err != nil {
		stop()
		return nil, nil, fmt.Errorf("%s start %d: %v: %s", script, shards, err, stderr.String())
	}
	return strings.Split(strings.TrimSpace(string(out)), ","), stop, nil
}

func clusterClient(addrs []string) *redis.ClusterClient {
	return redis.NewClusterClient(&redis.ClusterOptions{
		Addrs:                    addrs,
		ContextTimeoutEnabled:    true,
		MaintNotificationsConfig: &maintnotifications.Config{Mode: maintnotifications.ModeDisabled},
	})
}

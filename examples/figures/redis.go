package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"

	"github.com/seed70ea8305/idempotency"
)

var (
	// requestBody is ~100 bytes of JSON and responseBody 200, the shapes of
	// the root's benchmarks and of examples/loadtest.
	requestBody  = []byte(`{"name":"Concert Hall","slug":"concert-hall","capacity":1200,"city":"Berlin","currency":"EUR"}`)
	responseBody = []byte(`{"id":"ven_0123456789abcdef","object":"venue","name":"Concert Hall","slug":"concert-hall","capacity":1200,"city":"Berlin","currency":"EUR","status":"active","created":1700000000,"livemode":false}`)
)

// app answers every request with responseBody, as a 201.
var app = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusCreated)
	_, _ = w.Write(responseBody)
})

// serve sends one request with key through h and checks for a 201.
func serve(h http.Handler, key string) error {
	req := httptest.NewRequest(http.MethodPost, "/venues", strings.NewReader(string(requestBody)))
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", key)
	w := httptest.NewRecorder()
	h.ServeHTTP(w, req)
	if w.Code != http.StatusCreated {
		return fmt.Errorf("key %s: status %d: %s", key, w.Code, w.Body.String())
	}
	return nil
}

// redisServer is a redis-server of this program's own, so that the
// server's counters (INFO commandstats, cpu, memory) see this program's
// requests alone.
type redisServer struct {
	addr string
	cmd  *exec.Cmd
}

// startRedis starts bin on a free loopback port, without persistence and
// with noeviction (as the store requires), and waits for its PING.
func startRedis(ctx context.Context, bin string, extra ...string) (*redisServer, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	port := ln.Addr().(*net.TCPAddr).Port
	_ = ln.Close()
	args := append([]string{"--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
		"--maxmemory-policy", "noeviction"}, extra...)
	cmd := exec.Command(bin, args...)
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	s := &redisServer{addr: "127.0.0.1:" + strconv.Itoa(port), cmd: cmd}
	c := redis.NewClient(redisOptions(s.addr))
	defer c.Close()
	deadline := time.Now().Add(10 * time.Second)
	for c.Ping(ctx).Err() != nil {
		if time.Now().After(deadline) {
			s.stop()
			return nil, fmt.Errorf("%s did not answer on %s within 10 s", bin, s.addr)
		}
		time.Sleep(50 * time.Millisecond) // waiting for a process to listen: nothing to wait on
	}
	return s, nil
}

func (s *redisServer) stop() {
	_ = s.cmd.Process.Kill()
	_ = s.cmd.Wait()
}

func redisOptions(addr string) *redis.Options {
	return &redis.Options{
		Addr: addr,
		// As the README recommends: store calls bounded by their context.
		ContextTimeoutEnabled: true,
		// Maintenance notifications need Redis 8; older servers refuse
		// the handshake and go-redis would log about it.
		MaintNotificationsConfig: &maintnotifications.Config{Mode: maintnotifications.ModeDisabled},
	}
}

// roundTrips counts the client's calls to the server: one per command
// sent alone, one per pipeline.
type roundTrips struct{ n atomic.Int64 }

func (c *roundTrips) DialHook(next redis.DialHook) redis.DialHook { return next }
func (c *roundTrips) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error { c.n.Add(1); return next(ctx, cmd) }
}
func (c *roundTrips) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return func(ctx context.Context, cmds []redis.Cmder) error { c.n.Add(1); return next(ctx, cmds) }
}

// redisCost is what one request costs a Redis server, averaged over a
// phase of requests.
type redisCost struct {
	roundTrips float64 // client calls
	commands   float64 // commands the server ran (a script counts as EVALSHA plus the commands it calls)
	cmdMicros  float64 // microseconds in commands (INFO commandstats)
	cpuMicros  float64 // the server process's CPU, user and system (INFO cpu): commands, networking and the event loop
	bytes      float64 // used_memory growth (INFO memory), hash tables included: it moves in steps when they grow
	keys       float64 // keys added
	// topMicros is the time of the commands the client sent: a script
	// once, with the commands it calls, which commandstats also count on
	// their own (cmdMicros counts them twice).
	topMicros float64
	// What one more record costs once the store's fence counters (one per
	// hash tag, 65,536 at most, never expiring) all exist, as they soon
	// do: a few thousand requests still add one each.
	fenceKeys   float64 // fence counters added
	recordBytes float64 // used_memory growth less the fence counters' MEMORY USAGE
	recordUsage float64 // MEMORY USAGE of the other keys a request adds
}

// redisSnapshot is the server's counters at one moment.
type redisSnapshot struct {
	calls, usec, cpu, mem, keys float64
	usecOf                      map[string]float64 // usec by command
}

// metaCommands are the ones this program sends to read the counters.
var metaCommands = map[string]bool{"info": true, "dbsize": true, "config": true, "hello": true, "client": true, "memory": true, "scan": true, "ping": true, "command": true, "cluster": true}

func snapshotRedis(ctx context.Context, c redis.Cmdable) (redisSnapshot, error) {
	s := redisSnapshot{usecOf: make(map[string]float64)}
	info, err := c.Info(ctx, "commandstats", "cpu", "memory").Result()
	if err != nil {
		return s, err
	}
	sc := bufio.NewScanner(strings.NewReader(info))
	for sc.Scan() {
		k, v, ok := strings.Cut(strings.TrimSpace(sc.Text()), ":")
		if !ok {
			continue
		}
		switch {
		case strings.HasPrefix(k, "cmdstat_"):
			if metaCommands[strings.TrimPrefix(k, "cmdstat_")] {
				continue
			}
			for _, f := range strings.Split(v, ",") {
				name, val, _ := strings.Cut(f, "=")
				x, _ := strconv.ParseFloat(val, 64)
				switch name {
				case "calls":
					s.calls += x
				case "usec":
					s.usec += x
					s.usecOf[strings.TrimPrefix(k, "cmdstat_")] += x
				}
			}
		case k == "used_cpu_sys" || k == "used_cpu_user":
			x, _ := strconv.ParseFloat(v, 64)
			s.cpu += x * 1e6
		case k == "used_memory":
			s.mem, _ = strconv.ParseFloat(v, 64)
		}
	}
	n, err := c.DBSize(ctx).Result()
	s.keys = float64(n)
	return s, err
}

// measureRedis runs n requests, do(i) for each, between two snapshots of
// the server (read through meter) and returns the cost per request.
func measureRedis(ctx context.Context, meter redis.Cmdable, rt *roundTrips, n int, do func(i int) error) (redisCost, error) {
	before, err := snapshotRedis(ctx, meter)
	if err != nil {
		return redisCost{}, err
	}
	trips := rt.n.Load()
	for i := range n {
		if err := do(i); err != nil {
			return redisCost{}, err
		}
	}
	trips = rt.n.Load() - trips
	after, err := snapshotRedis(ctx, meter)
	if err != nil {
		return redisCost{}, err
	}
	k := 1 / float64(n)
	return redisCost{
		roundTrips: float64(trips) * k,
		commands:   (after.calls - before.calls) * k,
		cmdMicros:  (after.usec - before.usec) * k,
		cpuMicros:  (after.cpu - before.cpu) * k,
		bytes:      (after.mem - before.mem) * k,
		keys:       (after.keys - before.keys) * k,
	}, nil
}

// rawComplete is the floor's store-if-owner script, as in the root's
// BenchmarkRedisOverhead.
var rawComplete = redis.NewScript(`
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, #ARGV[1]) == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 1
end
return 0`)

// The floor's values: a claim of the size of the store's, and a completed
// record holding the response body.
var (
	floorClaim = "\x01F\x1aTOKEN-TOKEN-TOKEN-TOKEN-TO" + "\x40" + string(make([]byte, 64)) + "\x00"
	floorDone  = "\x01C\x1aTOKEN-TOKEN-TOKEN-TOKEN-TO" + string(responseBody)
)

// redisCosts are the per-request costs of the store and of the floor
// (the script floor; plain is the floor of plain commands, measured for
// topMicros alone).
type redisCosts struct {
	storeFirst, storeReplay, floorFirst, floorReplay redisCost
	plainFirst, plainReplay                          redisCost
}

// measureRedisCosts measures, on a server of its own at addr, first
// requests and replays through the middleware on a RedisStore with the
// default 24 h TTL, and the floor's commands.
func measureRedisCosts(ctx context.Context, addr string, n int) (redisCosts, error) {
	var out redisCosts
	meter := redis.NewClient(redisOptions(addr))
	defer meter.Close()
	client := redis.NewClient(redisOptions(addr))
	defer client.Close()
	rt := &roundTrips{}
	client.AddHook(rt)
	store, err := idempotency.NewRedisStore(client, idempotency.RedisOptions{Prefix: "figures:"})
	if err != nil {
		return out, err
	}
	mw, err := idempotency.New(store, idempotency.Options{})
	if err != nil {
		return out, err
	}
	h := mw.Handler(app)
	// Warm up: connections, scripts loaded, the replay's key stored.
	for i := range 10 {
		if err := serve(h, "warm-"+strconv.Itoa(i)); err != nil {
			return out, err
		}
	}
	if err := serve(h, "replay"); err != nil {
		return out, err
	}
	if err := rawComplete.Load(ctx, client).Err(); err != nil {
		return out, err
	}
	ttl := 24 * time.Hour
	floorFirst := func(i int) error {
		key := "floor:" + strconv.Itoa(i)
		if err := client.SetArgs(ctx, key, floorClaim, redis.SetArgs{Mode: "NX", TTL: ttl, Get: true}).Err(); !errors.Is(err, redis.Nil) {
			return fmt.Errorf("floor claim: %v", err)
		}
		return rawComplete.EvalSha(ctx, client, []string{key}, floorClaim[:29], floorDone, ttl.Milliseconds()).Err()
	}
	if err := floorFirst(-1); err != nil {
		return out, err
	}
	type phase struct {
		cost *redisCost
		do   func(i int) error
	}
	phases := []phase{
		{&out.storeFirst, func(i int) error { return serve(h, "first-"+strconv.Itoa(i)) }},
		{&out.storeReplay, func(int) error { return serve(h, "replay") }},
		{&out.floorFirst, floorFirst},
		{&out.floorReplay, func(int) error {
			err := client.SetArgs(ctx, "floor:-1", floorClaim, redis.SetArgs{Mode: "NX", TTL: ttl, Get: true}).Err()
			if err != nil {
				return fmt.Errorf("floor replay: %v", err)
			}
			return nil
		}},
	}
	for i, p := range phases {
		measure := measureRedis
		if i == 0 {
			measure = storeFirstPhase
		}
		if *p.cost, err = measure(ctx, meter, rt, n, p.do); err != nil {
			return out, err
		}
	}
	// Each command the client sent, counted once: scripts by EVALSHA's
	// time, which includes the commands they call. The script floor's
	// first request sends SET, and its script calls SET, so its two
	// commands are measured apart. The plain floor: SET NX PX then SET
	// (first), GET (replay).
	scripts := []string{"evalsha", "eval"}
	top := []struct {
		micros *float64
		names  []string
		do     func(i int) error
	}{
		{&out.storeFirst.topMicros, scripts, func(i int) error { return serve(h, "top-"+strconv.Itoa(i)) }},
		{&out.storeReplay.topMicros, scripts, func(int) error { return serve(h, "replay") }},
		{&out.plainFirst.topMicros, []string{"set"}, func(i int) error {
			key := "plain:" + strconv.Itoa(i)
			if err := client.SetArgs(ctx, key, floorClaim, redis.SetArgs{Mode: "NX", TTL: ttl}).Err(); err != nil {
				return fmt.Errorf("plain floor claim: %v", err)
			}
			return client.Set(ctx, key, floorDone, ttl).Err()
		}},
		{&out.plainReplay.topMicros, []string{"get"}, func(int) error { return client.Get(ctx, "plain:0").Err() }},
		{&out.floorFirst.topMicros, []string{"set"}, func(i int) error {
			err := client.SetArgs(ctx, "top:"+strconv.Itoa(i), floorClaim, redis.SetArgs{Mode: "NX", TTL: ttl, Get: true}).Err()
			if !errors.Is(err, redis.Nil) {
				return fmt.Errorf("floor claim: %v", err)
			}
			return nil
		}},
		{&out.floorFirst.topMicros, scripts, func(i int) error {
			return rawComplete.EvalSha(ctx, client, []string{"top:" + strconv.Itoa(i)}, floorClaim[:29], floorDone, ttl.Milliseconds()).Err()
		}},
		{&out.floorReplay.topMicros, []string{"set"}, phases[3].do},
	}
	for _, p := range top {
		micros, err := measureTopLevel(ctx, meter, n, p.names, p.do)
		if err != nil {
			return out, err
		}
		*p.micros += micros
	}
	out.floorFirst.recordBytes, out.floorFirst.recordUsage = out.floorFirst.bytes, out.floorFirst.bytes
	u, err := averageUsage(ctx, meter, "floor:*", 1000, false)
	out.floorFirst.recordUsage = u * out.floorFirst.keys
	return out, err
}

// measureTopLevel runs n requests, do(i) for each, and returns the
// microseconds per request that INFO commandstats counts under names:
// the commands the client sent. A script's calls count inside its own
// time and under their names too, so names leave them out, and a phase
// whose client sends a command of the same name as one its scripts call
// must run as two (see measureRedisCosts).
func measureTopLevel(ctx context.Context, meter redis.Cmdable, n int, names []string, do func(i int) error) (float64, error) {
	before, err := snapshotRedis(ctx, meter)
	if err != nil {
		return 0, err
	}
	for i := range n {
		if err := do(i); err != nil {
			return 0, err
		}
	}
	after, err := snapshotRedis(ctx, meter)
	var total float64
	for _, name := range names {
		total += after.usecOf[name] - before.usecOf[name]
	}
	return total / float64(n), err
}

// storeFirstPhase measures first requests and splits off what the fence
// counters they create cost.
func storeFirstPhase(ctx context.Context, meter redis.Cmdable, rt *roundTrips, n int, do func(i int) error) (redisCost, error) {
	fences := func() (int, error) {
		k := 0
		iter := meter.Scan(ctx, 0, "figures:*fence", 1000).Iterator()
		for iter.Next(ctx) {
			k++
		}
		return k, iter.Err()
	}
	before, err := fences()
	if err != nil {
		return redisCost{}, err
	}
	c, err := measureRedis(ctx, meter, rt, n, do)
	if err != nil {
		return c, err
	}
	after, err := fences()
	if err != nil {
		return c, err
	}
	c.fenceKeys = float64(after-before) / float64(n)
	fenceUsage, err := averageUsage(ctx, meter, "figures:*fence", 1000, true)
	if err != nil {
		return c, err
	}
	recordUsage, err := averageUsage(ctx, meter, "figures:*", 1000, false)
	if err != nil {
		return c, err
	}
	c.recordBytes = c.bytes - c.fenceKeys*fenceUsage
	c.recordUsage = recordUsage * (c.keys - c.fenceKeys)
	return c, nil
}

// averageUsage is the average MEMORY USAGE of up to limit keys matching
// pattern, fence counters only or all but them.
func averageUsage(ctx context.Context, c redis.Cmdable, pattern string, limit int, fence bool) (float64, error) {
	var sum, n float64
	iter := c.Scan(ctx, 0, pattern, 500).Iterator()
	for iter.Next(ctx) && n < float64(limit) {
		if strings.HasSuffix(iter.Val(), "fence") != fence {
			continue
		}
		u, err := c.MemoryUsage(ctx, iter.Val(), 0).Result()
		if err != nil {
			return 0, err
		}
		sum += float64(u)
		n++
	}
	if err := iter.Err(); err != nil || n == 0 {
		return 0, err
	}
	return sum / n, nil
}

// redisServerBin is the redis-server binary to start, or why there is none.
func redisServerBin() (string, string) {
	if bin := os.Getenv(redisServerEnv); bin != "" {
		return bin, ""
	}
	if bin, err := exec.LookPath("redis-server"); err == nil {
		return bin, ""
	}
	return "", redisServerEnv + " is not set and no redis-server is on the PATH"
}

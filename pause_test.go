//go:build linux

// Linux only: the test stops processes with SIGSTOP, reads their state in
// /proc and ties their life to the test's with Pdeathsig.

package idempotency_test

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/redistest"
)

// pausedChildEnv, set in a re-executed test binary, makes TestPausedOwner
// serve as one instance instead of running the test. Its value is
// "name redis-address prefix work".
const pausedChildEnv = "IDEMPOTENCY_TEST_PAUSED_CHILD"

const (
	// pauseWithin bounds every wait of TestPausedOwner: generous, so that
	// only a stuck instance fails it, not a loaded machine.
	pauseWithin = time.Minute
	// pausedLease is the instances' lease: short, so a stop outlasts it
	// soon, and long enough that B, which takes the keys over, keeps its
	// own leases on a loaded 2-core machine (400 ms did not, under six
	// busy loops).
	pausedLease = time.Second
	// pausedWork is how long A's handlers work before their side effect:
	// long enough that A is stopped before it ends; a request whose work
	// ended before the stop is not counted as a trial.
	pausedWork = 2 * pausedLease
)

// TestPausedOwner (issue 19, item 1): a process stopped (SIGSTOP) for
// longer than its lease must not act as the owner of its keys when it
// resumes. Instance A's handlers start, A is stopped, instance B takes
// every key over once A's lease has lapsed, and A is resumed once its
// handlers' work has ended. Each handler checks its context right before
// its side effect: none may find it live, and no client of A may get a
// 2xx that the stored response (B's) contradicts.
func TestPausedOwner(t *testing.T) {
	const (
		perStop   = 20 // concurrent requests to A per stop
		want      = 20 // trials wanted in all
		maxCycles = 5
	)
	if spec := os.Getenv(pausedChildEnv); spec != "" {
		servePausedInstance(t, spec)
		return
	}
	addr, _ := redistest.StartServer(t)
	h := &pauseHarness{
		rdb:       faultClient(t, addr, faultReadTimeout),
		prefix:    redistest.Prefix(t),
		transport: &http.Transport{DisableKeepAlives: true},
	}
	h.client = &http.Client{Transport: h.transport, Timeout: pauseWithin}
	t.Cleanup(func() { h.close(t) })
	h.a = h.start(t, "A", addr, pausedWork)
	h.b = h.start(t, "B", addr, 0)

	fig := pauseFigures{answersOfA: make(map[int]int)}
	// More stops only if the machine was too slow to stop A before its
	// handlers' work ended.
	for cycle := 0; cycle < maxCycles && fig.trials < want; cycle++ {
		keys := make([]string, perStop)
		for i := range keys {
			keys[i] = fmt.Sprintf("c%d-%02d", cycle, i)
		}
		h.cycle(t, keys, &fig)
		fig.stops++
	}
	t.Logf("SIGSTOP trials: %d (of %d requests, %d stops); live contexts after takeover: %d; contradicted 2xx: %d; taken over by B: %d of %d; A's clients got (status: count) %v",
		fig.trials, fig.requests, fig.stops, fig.live, fig.contradicted, fig.tookOver, fig.trials, fig.answersOfA)
	require.GreaterOrEqual(t, fig.trials, want, "A was stopped too late: its handlers' work had ended")
	assert.Equal(t, fig.trials, fig.tookOver, "B takes over every key of the stopped A")
	assert.Zero(t, fig.live, "a handler of the resumed A found its context live after B took its key over")
	assert.Zero(t, fig.contradicted, "a client of A got a 2xx that the replay contradicts")
}

// servePausedInstance is the child's side: it serves the middleware on a
// loopback port, printed on stdout, until the parent kills it. Its
// handler works for the given time (A) or not at all (B), then checks its
// context: only if it is live does it do its side effect and answer 201
// with a body naming the instance and the attempt.
func servePausedInstance(t *testing.T, spec string) {
	f := strings.Fields(spec)
	require.Len(t, f, 4, spec)
	name, addr, prefix := f[0], f[1], f[2]
	work, err := time.ParseDuration(f[3])
	require.NoError(t, err)
	client := faultClient(t, addr, faultReadTimeout)
	store, err := idempotency.NewRedisStore(client, idempotency.RedisOptions{Prefix: prefix})
	require.NoError(t, err)
	mw := newMiddleware(t, store, idempotency.Options{Lease: pausedLease, Wait: pauseWithin, MaxWaiters: 1024})

	handler := http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx := r.Context()
		claim, _ := idempotency.ClaimFromContext(ctx)
		bg := context.Background() // the test's bookkeeping outlives the request
		if work > 0 {
			// The end of the work is fixed before the parent hears of the
			// start, so the parent can tell whether the stop came first.
			end := time.Now().Add(work)
			if err := client.RPush(bg, prefix+"test:started", fmt.Sprintf("%s %d", claim.Key, end.UnixNano())).Err(); err != nil {
				panic(err)
			}
			time.Sleep(time.Until(end)) // the work in progress
		}
		if ctx.Err() != nil {
			return // cut short: nothing done, nothing written
		}
		// The side effect, which also records that this instance found its
		// context live.
		if err := client.RPush(bg, prefix+"test:effect:"+claim.Key, name).Err(); err != nil {
			panic(err)
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"by":%q,"fence":%d}`, name, claim.Fence)
	})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	require.NoError(t, err)
	fmt.Printf("listening %s\n", l.Addr())
	srv := &http.Server{Handler: mw.Handler(handler), ReadHeaderTimeout: pauseWithin}
	t.Fatal(srv.Serve(l)) // Serve returns only on failure
}

// pauseHarness runs the two instances and the parent's requests to them.
type pauseHarness struct {
	rdb       *redis.Client // the test's bookkeeping, in the store's Redis
	prefix    string
	transport *http.Transport
	client    *http.Client
	a, b      *pausedInstance
	instances []*pausedInstance
	requests  sync.WaitGroup // requests in flight in goroutines
}

// pausedInstance is one child process serving the middleware.
type pausedInstance struct {
	name   string
	cmd    *exec.Cmd
	out    *instanceOutput
	url    string
	exited chan struct{}
}

// pauseFigures adds up what the stops showed.
type pauseFigures struct {
	stops, requests int
	trials          int // requests whose work in A ended while A was stopped
	live            int // of the trials: A's handler found its context live
	tookOver        int // of the trials: B ran the handler and stored its 201
	contradicted    int // A's client got a 2xx other than the replay
	answersOfA      map[int]int
}

// pauseAnswer is what a client got.
type pauseAnswer struct {
	key      string
	status   int
	replayed bool
	body     string
	err      error
}

// start re-executes the test binary as instance name, and returns once it
// listens.
func (h *pauseHarness) start(t *testing.T, name, redisAddr string, work time.Duration) *pausedInstance {
	t.Helper()
	spec := strings.Join([]string{name, redisAddr, h.prefix, work.String()}, " ")
	cmd := exec.Command(os.Args[0], "-test.run=^TestPausedOwner$", "-test.count=1")
	cmd.Env = append(os.Environ(), pausedChildEnv+"="+spec)
	out := &instanceOutput{listening: make(chan string, 1)}
	cmd.Stdout, cmd.Stderr = out, out
	// An instance must not outlive a test binary that dies without
	// running its cleanups (a timeout's panic).
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	require.NoError(t, cmd.Start())
	in := &pausedInstance{name: name, cmd: cmd, out: out, exited: make(chan struct{})}
	h.instances = append(h.instances, in)
	go func() {
		cmd.Wait()
		close(in.exited)
	}()
	select {
	case addr := <-out.listening:
		in.url = "http://" + addr
	case <-in.exited:
		t.Fatalf("instance %s exited before it listened: %s", name, out)
	case <-time.After(pauseWithin):
		t.Fatalf("instance %s did not listen within %v: %s", name, pauseWithin, out)
	}
	return in
}

// close resumes and kills the instances, then waits for the requests
// they were serving to fail, so that no goroutine outlives the test.
func (h *pauseHarness) close(t *testing.T) {
	for _, in := range h.instances {
		in.cmd.Process.Signal(syscall.SIGCONT)
		in.cmd.Process.Kill()
		<-in.exited
		switch out := in.out.String(); {
		case strings.Contains(out, "WARNING: DATA RACE"):
			t.Errorf("instance %s had a data race:\n%s", in.name, out)
		case t.Failed():
			t.Logf("instance %s wrote:\n%s", in.name, out)
		}
	}
	h.requests.Wait()
	h.transport.CloseIdleConnections()
}

// cycle sends one request per key to A, stops A once every handler has
// started, lets B take every key over, resumes A once the handlers' work
// has ended, and adds up what each side did.
func (h *pauseHarness) cycle(t *testing.T, keys []string, fig *pauseFigures) {
	ctx := context.Background()
	fromA := make(chan pauseAnswer, len(keys))
	for _, key := range keys {
		h.ask(h.a, key, fromA, false)
	}
	ends := make(map[string]time.Time, len(keys))
	for range keys {
		v, err := h.rdb.BLPop(ctx, pauseWithin, h.prefix+"test:started").Result()
		require.NoError(t, err, "A's handlers did not all start")
		key, end, _ := strings.Cut(v[1], " ")
		ns, err := strconv.ParseInt(end, 10, 64)
		require.NoError(t, err, v[1])
		ends[key] = time.Unix(0, ns)
	}

	h.a.stop(t)
	stopped := time.Now() // A stopped no later than this

	fromB := make(chan pauseAnswer, len(keys))
	for _, key := range keys {
		h.ask(h.b, key, fromB, true)
	}
	byB := make(map[string]pauseAnswer, len(keys))
	for range keys {
		ans := waitFor(t, fromB, pauseWithin, "B's answer while A is stopped")
		require.NoError(t, ans.err, "asking B for %s", ans.key)
		byB[ans.key] = ans
	}

	// Not a synchronisation but the length of the fault: A stays stopped
	// until its handlers' work has ended, so that each resumes with its
	// work done and its lease long gone. Load only makes the pause longer.
	var last time.Time
	for _, end := range ends {
		if end.After(last) {
			last = end
		}
	}
	time.Sleep(time.Until(last.Add(50 * time.Millisecond)))
	h.a.resume(t)

	byA := make(map[string]pauseAnswer, len(keys))
	for range keys {
		ans := waitFor(t, fromA, pauseWithin, "A's answer after it resumed")
		require.NoError(t, ans.err, "asking A for %s", ans.key)
		byA[ans.key] = ans
	}

	for _, key := range keys {
		replay := h.post(h.b, key)
		require.NoError(t, replay.err, "replay of %s", key)
		require.Equal(t, http.StatusCreated, replay.status, "replay of %s: %s", key, replay.body)
		require.True(t, replay.replayed, "replay of %s: %s", key, replay.body)
		effects, err := h.rdb.LRange(ctx, h.prefix+"test:effect:"+key, 0, -1).Result()
		require.NoError(t, err)

		fig.requests++
		a := byA[key]
		fig.answersOfA[a.status]++
		if a.status >= 200 && a.status < 300 && a.body != replay.body {
			fig.contradicted++
			t.Logf("key %s: A's client got %d %s, the replay is %s", key, a.status, a.body, replay.body)
		}
		if !stopped.Before(ends[key]) {
			continue // its work ended before the stop: no trial
		}
		fig.trials++
		if slices.Contains(effects, "A") {
			fig.live++
		}
		if b := byB[key]; b.status == http.StatusCreated && !b.replayed && b.body == replay.body && strings.Contains(b.body, `"by":"B"`) {
			fig.tookOver++
		}
	}
}

// ask sends a request for key to in, in a goroutine, and delivers its
// answer on answers (which has room for it). untilNot409 repeats it while
// it gets 409: B waits for the key ([idempotency.WithWait]), and 409
// means only that its wait ended first.
func (h *pauseHarness) ask(in *pausedInstance, key string, answers chan<- pauseAnswer, untilNot409 bool) {
	h.requests.Add(1)
	go func() {
		defer h.requests.Done()
		for {
			ans := h.post(in, key)
			if !untilNot409 || ans.err != nil || ans.status != http.StatusConflict {
				answers <- ans
				return
			}
		}
	}()
}

func (h *pauseHarness) post(in *pausedInstance, key string) pauseAnswer {
	ans := pauseAnswer{key: key}
	req, err := http.NewRequest(http.MethodPost, in.url+"/venues", strings.NewReader(`{"name":"Hall"}`))
	if err != nil {
		ans.err = err
		return ans
	}
	req.Header.Set("Content-Type", "application/json")
	req.Header.Set("Idempotency-Key", key)
	resp, err := h.client.Do(req)
	if err != nil {
		ans.err = err
		return ans
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	ans.status, ans.body, ans.err = resp.StatusCode, string(body), err
	ans.replayed = resp.Header.Get("X-Idempotent-Replayed") == "true"
	return ans
}

// stop sends SIGSTOP and returns once every thread of the instance is
// stopped.
func (in *pausedInstance) stop(t *testing.T) {
	t.Helper()
	require.NoError(t, syscall.Kill(in.cmd.Process.Pid, syscall.SIGSTOP))
	deadline := time.Now().Add(pauseWithin)
	for !allStopped(in.cmd.Process.Pid) {
		require.True(t, time.Now().Before(deadline), "instance %s not stopped within %v", in.name, pauseWithin)
		time.Sleep(time.Millisecond) // /proc has no event to wait for
	}
}

func (in *pausedInstance) resume(t *testing.T) {
	t.Helper()
	require.NoError(t, syscall.Kill(in.cmd.Process.Pid, syscall.SIGCONT))
}

// allStopped reports whether every thread of process pid is in the
// stopped state (T in /proc/pid/task/*/stat).
func allStopped(pid int) bool {
	stats, _ := filepath.Glob(fmt.Sprintf("/proc/%d/task/*/stat", pid))
	for _, name := range stats {
		stat, err := os.ReadFile(name)
		if err != nil {
			continue // the thread exited
		}
		// "tid (comm) state ...": comm may hold ')'.
		if i := bytes.LastIndexByte(stat, ')'); i < 0 || i+2 >= len(stat) || stat[i+2] != 'T' {
			return false
		}
	}
	return len(stats) > 0
}

// instanceOutput collects what an instance writes and hands over the
// address from its "listening" line.
type instanceOutput struct {
	mu        sync.Mutex
	buf       bytes.Buffer
	listening chan string // receives the address once
	found     bool
}

func (o *instanceOutput) Write(p []byte) (int, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.buf.Write(p)
	if !o.found {
		for line := range strings.Lines(o.buf.String()) {
			if addr, ok := strings.CutPrefix(line, "listening "); ok && strings.HasSuffix(addr, "\n") {
				o.found = true
				o.listening <- strings.TrimSpace(addr)
				break
			}
		}
	}
	return len(p), nil
}

func (o *instanceOutput) String() string {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.buf.String()
}

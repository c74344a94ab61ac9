package redistest

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// ServerEnv holds the path of a redis-server binary, for tests that start
// servers of their own (to stop, restart, fill or fail over them) instead
// of sharing the one named by URLEnv.
const ServerEnv = "IDEMPOTENCY_TEST_REDIS_SERVER"

// startTimeout bounds how long a new server may take to answer PING.
const startTimeout = 10 * time.Second

// StartServer starts a redis-server of the test's own on a free loopback
// port, keeping nothing on disk, with args appended to its command line
// (for example "--maxmemory", "2mb"). It returns the server's address and
// a function that kills it (SIGKILL, as a crash would); the server is also
// killed when the test ends. It skips the test when ServerEnv is unset and
// fails it when the server does not start.
func StartServer(t testing.TB, args ...string) (addr string, stop func()) {
	t.Helper()
	binary := serverBinary(t)
	var lastErr error
	for range 3 { // another process may take the free port first
		addr := freeAddr(t)
		stop, err := startServer(t, binary, addr, args)
		if err == nil {
			return addr, stop
		}
		lastErr = err
	}
	t.Fatalf("redis-server did not start: %v", lastErr)
	return "", nil
}

// StartServerAt starts a server like [StartServer] on the given address,
// typically one a stopped server used: a restart.
func StartServerAt(t testing.TB, addr string, args ...string) (stop func()) {
	t.Helper()
	binary := serverBinary(t)
	var lastErr error
	for range 10 { // the old server's socket may linger a moment
		stop, err := startServer(t, binary, addr, args)
		if err == nil {
			return stop
		}
		lastErr = err
		time.Sleep(100 * time.Millisecond)
	}
	t.Fatalf("redis-server did not start on %s: %v", addr, lastErr)
	return nil
}

func serverBinary(t testing.TB) string {
	t.Helper()
	binary := os.Getenv(ServerEnv)
	if binary == "" {
		t.Skipf("%s not set: skipping the test that runs its own redis-server", ServerEnv)
	}
	return binary
}

func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

func startServer(t testing.TB, binary, addr string, args []string) (func(), error) {
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		return nil, err
	}
	dir := t.TempDir()
	logFile := filepath.Join(dir, "redis.log")
	cmdArgs := append([]string{
		"--port", port, "--bind", host, "--save", "", "--appendonly", "no",
		"--dir", dir, "--logfile", logFile, "--daemonize", "no",
	}, args...)
	cmd := exec.Command(binary, cmdArgs...)
	if err := cmd.Start(); err != nil {
		return nil, err
	}
	exited := make(chan struct{})
	go func() {
		cmd.Wait()
		close(exited)
	}()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cmd.Process.Kill()
			<-exited
		})
	}
	deadline := time.Now().Add(startTimeout)
	for {
		if ping(addr) == nil {
			t.Cleanup(stop)
			return stop, nil
		}
		select {
		case <-exited:
			log, _ := os.ReadFile(logFile)
			return nil, fmt.Errorf("redis-server %s exited: %s", strings.Join(cmdArgs, " "), lastLines(string(log), 5))
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			stop()
			return nil, fmt.Errorf("redis-server on %s did not answer PING within %v", addr, startTimeout)
		}
	}
}

// ping sends one inline PING and expects +PONG.
func ping(addr string) error {
	c, err := net.DialTimeout("tcp", addr, 200*time.Millisecond)
	if err != nil {
		return err
	}
	defer c.Close()
	c.SetDeadline(time.Now().Add(time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if line != "+PONG\r\n" {
		return fmt.Errorf("PING answered %q", line)
	}
	return nil
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, " | ")
}

// ClientWith returns a client built from opt, closed when the test ends,
// without checking that anything answers: for tests that choose their own
// timeouts and retries. Like every client here, it skips the maintenance
// notification handshake that servers before 8.0 refuse.
func ClientWith(t testing.TB, opt *redis.Options) *redis.Client {
	opt.MaintNotificationsConfig = quiet
	client := redis.NewClient(opt)
	t.Cleanup(func() { client.Close() })
	return client
}

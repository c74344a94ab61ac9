// Package redistest gives tests a Redis to talk to: miniredis in process,
// or a real server named by an environment variable.
package redistest

import (
	"context"
	"crypto/rand"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/alicebob/miniredis/v2"
	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
)

// Environment variables naming real servers. .ci/run sets them.
const (
	// URLEnv holds a redis:// URL of a single Redis server.
	URLEnv = "IDEMPOTENCY_TEST_REDIS_URL"
	// ClusterEnv holds comma-separated host:port addresses of Redis
	// Cluster nodes.
	ClusterEnv = "IDEMPOTENCY_TEST_REDIS_CLUSTER"
)

// quiet turns off go-redis' maintenance-notification handshake, which
// servers before 8.0 and miniredis refuse (go-redis then logs about it).
var quiet = &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}

// Options returns client options for the server named by URLEnv, or skips
// the test when the variable is unset.
func Options(t testing.TB) *redis.Options {
	t.Helper()
	url := os.Getenv(URLEnv)
	if url == "" {
		t.Skipf("%s not set: skipping the test against a real Redis", URLEnv)
	}
	opt, err := redis.ParseURL(url)
	if err != nil {
		t.Fatalf("%s=%q: %v", URLEnv, url, err)
	}
	opt.MaintNotificationsConfig = quiet
	return opt
}

// Client connects to the real Redis named by URLEnv. It skips the test when
// the variable is unset and fails it when the server does not answer.
func Client(t testing.TB) *redis.Client {
	t.Helper()
	return connect(t, redis.NewClient(Options(t)))
}

// Cluster connects to the Redis Cluster named by ClusterEnv, skipping or
// failing like [Client].
func Cluster(t testing.TB) *redis.ClusterClient {
	t.Helper()
	addrs := os.Getenv(ClusterEnv)
	if addrs == "" {
		t.Skipf("%s not set: skipping the test against a real Redis Cluster", ClusterEnv)
	}
	return connect(t, redis.NewClusterClient(&redis.ClusterOptions{
		Addrs:                    strings.Split(addrs, ","),
		MaintNotificationsConfig: quiet,
	}))
}

// Miniredis starts an in-process miniredis and a client for it; both stop
// when the test ends.
func Miniredis(t testing.TB) (*miniredis.Miniredis, *redis.Client) {
	t.Helper()
	mr := miniredis.RunT(t)
	client := redis.NewClient(&redis.Options{Addr: mr.Addr(), MaintNotificationsConfig: quiet})
	t.Cleanup(func() { client.Close() })
	return mr, client
}

// Prefix returns a key prefix no other test run uses, so tests can share a
// real server without flushing it.
func Prefix(t testing.TB) string {
	return "idemtest:" + rand.Text()[:10] + ":"
}

func connect[C redis.UniversalClient](t testing.TB, client C) C {
	t.Helper()
	t.Cleanup(func() { client.Close() })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if err := client.Ping(ctx).Err(); err != nil {
		t.Fatalf("Redis named by the environment does not answer: %v", err)
	}
	return client
}

// ClientFor returns a client for addr without checking that anything
// answers there: for tests that point it at a dead or faulty address. Its
// timeouts are short so such tests end quickly.
func ClientFor(t testing.TB, addr string) *redis.Client {
	client := redis.NewClient(&redis.Options{
		Addr:                     addr,
		DialTimeout:              200 * time.Millisecond,
		ReadTimeout:              200 * time.Millisecond,
		WriteTimeout:             200 * time.Millisecond,
		MaxRetries:               1,
		MaintNotificationsConfig: quiet,
	})
	t.Cleanup(func() { client.Close() })
	return client
}

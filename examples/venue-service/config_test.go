package main

// Tests of the configuration: -h, and the rules that keep the public
// development defaults away from a real Stripe account.

import (
	"bytes"
	"errors"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
)

// settingsEnv are the environment variables the service reads.
var settingsEnv = []string{"ADDR", "REDIS_URL", "DATABASE_URL", "ADMIN_KEY", "ADMIN_REDRIVE", "STRIPE_WEBHOOK_SECRET", "API_KEYS", "STRIPE_SECRET_KEY",
	"FAKE_STRIPE_LATENCY", "CHAOS_FAIL_AFTER_STRIPE"}

// runBinary runs the binary to its end with args and, of the settings,
// only the environment variables in env.
func runBinary(t *testing.T, env []string, args ...string) (stdout, stderr string, exitCode int) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	for _, kv := range os.Environ() {
		name, _, _ := strings.Cut(kv, "=")
		if !contains(settingsEnv, name) {
			cmd.Env = append(cmd.Env, kv)
		}
	}
	cmd.Env = append(cmd.Env, env...)
	var out, errOut bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errOut
	err := cmd.Run()
	var exit *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &exit):
		exitCode = exit.ExitCode()
	default:
		t.Fatalf("running venue-service: %v", err)
	}
	return out.String(), errOut.String(), exitCode
}

func contains(list []string, s string) bool {
	for _, v := range list {
		if v == s {
			return true
		}
	}
	return false
}

// TestHelp: -h (and -help, --help) prints every flag with its environment
// variable and default, the environment-only setting, the test switches
// and the subcommands, on stdout, and exits 0.
func TestHelp(t *testing.T) {
	var flags []string
	var a, b, c, d, e, f, g, h string
	for _, o := range options(&a, &b, &c, &d, &e, &f, &g, &h) {
		flags = append(flags, o.flag)
	}
	assert.Equal(t, []string{"addr", "redis", "database-url", "webhook-secret", "partner-webhook-secret", "api-keys", "admin-key", "admin-redrive"}, flags, "the flags; update the test's list when adding one")

	for _, arg := range []string{"-h", "-help", "--help"} {
		stdout, stderr, code := runBinary(t, nil, arg)
		assert.Equal(t, 0, code, "%s exits 0; stderr: %s", arg, stderr)
		assert.Empty(t, stderr, arg)
		assert.NotContains(t, stdout, "bad configuration", arg)
		flat := strings.Join(strings.Fields(stdout), " ")
		for _, want := range []string{
			"-addr, env ADDR (default: 127.0.0.1:8080)",
			"-redis, env REDIS_URL (default: unset)",
			"-database-url, env DATABASE_URL (default: unset)",
			"-webhook-secret, env STRIPE_WEBHOOK_SECRET (default: unset)",
			"unset: whsec_dev_secret with the fake Stripe, required with STRIPE_SECRET_KEY",
			"-api-keys, env API_KEYS (default: unset)",
			"unset: dev-key-a:tenant-a,dev-key-b:tenant-b with the fake Stripe, required with STRIPE_SECRET_KEY",
			"STRIPE_SECRET_KEY (default: unset)",
			"Test switches",
			"FAKE_STRIPE_LATENCY (default: 0)",
			"CHAOS_FAIL_AFTER_STRIPE (default: 0)",
			"venue-service sign [-secret S] < event.json",
			"venue-service -h",
			"Authorization: Bearer <api key>",
			"POST /webhooks/stripe is authenticated by its Stripe-Signature header",
			"sign [-secret S] < event.json print a Stripe-Signature header",
		} {
			assert.Contains(t, flat, want, arg)
		}
		for _, line := range strings.Split(stdout, "\n") {
			assert.LessOrEqual(t, len(line), 80, "line too long: %q", line)
		}
	}

	stdout, _, code := runBinary(t, nil, "sign", "-h")
	assert.Equal(t, 0, code)
	assert.Contains(t, stdout, "-secret")
	assert.Contains(t, stdout, "STRIPE_WEBHOOK_SECRET")

	_, stderr, code := runBinary(t, nil, "-nope")
	assert.Equal(t, 2, code)
	assert.Contains(t, stderr, "venue-service -h lists the settings")
}

// TestRealStripeKeyRefusesDevelopmentDefaults: with STRIPE_SECRET_KEY set
// the service does not start without its own webhook secret and API keys,
// with the public development secret, or with a test switch.
func TestRealStripeKeyRefusesDevelopmentDefaults(t *testing.T) {
	const realKey = "STRIPE_SECRET_KEY=sk_test_51Hxyz0example"
	ok := []string{realKey, "STRIPE_WEBHOOK_SECRET=whsec_from_the_dashboard", "API_KEYS=k1:acme"}
	for _, tc := range []struct {
		name string
		env  []string
		args []string
		want string
	}{
		{"no webhook secret", []string{realKey, "API_KEYS=k1:acme"}, nil, "STRIPE_SECRET_KEY is set but STRIPE_WEBHOOK_SECRET (-webhook-secret) is not"},
		{"no webhook secret nor API keys", []string{realKey}, nil, "STRIPE_WEBHOOK_SECRET"},
		{"the development secret", []string{realKey, "STRIPE_WEBHOOK_SECRET=whsec_dev_secret", "API_KEYS=k1:acme"}, nil, "public development secret"},
		{"the development secret as a flag", ok, []string{"-webhook-secret", "whsec_dev_secret"}, "public development secret"},
		{"no API keys", []string{realKey, "STRIPE_WEBHOOK_SECRET=whsec_from_the_dashboard"}, nil, "STRIPE_SECRET_KEY is set but API_KEYS (-api-keys) is not"},
		{"latency switch", append(ok, "FAKE_STRIPE_LATENCY=1s"), nil, "work only with the fake Stripe"},
		{"chaos switch", append(ok, "CHAOS_FAIL_AFTER_STRIPE=1"), nil, "work only with the fake Stripe"},
		{"malformed API keys", []string{"API_KEYS=k1"}, nil, "API_KEYS (-api-keys): want key:tenant pairs"},
		{"duplicate API key", []string{"API_KEYS=k1:a,k1:b"}, nil, "a key is listed twice"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, stderr, code := runBinary(t, tc.env, append([]string{"-addr", "127.0.0.1:0"}, tc.args...)...)
			assert.Equal(t, 2, code, stderr)
			assert.Contains(t, stderr, "bad configuration")
			assert.Contains(t, stderr, tc.want)
			assert.NotContains(t, stderr, "listening")
		})
	}
}

// TestRealStripeKeyStarts: with all three set, the service starts against
// api.stripe.com (it calls Stripe only when a venue is created), prints no
// development settings and authenticates with the configured keys.
func TestRealStripeKeyStarts(t *testing.T) {
	p := start(t, "STRIPE_SECRET_KEY=sk_test_51Hxyz0example", "STRIPE_WEBHOOK_SECRET=whsec_from_the_dashboard", "API_KEYS=k1:acme")
	log := p.logText()
	assert.Contains(t, log, "stripe=api.stripe.com")
	assert.Contains(t, log, "tenants=acme")
	assert.NotContains(t, log, "whsec_dev_secret")
	assert.NotContains(t, log, "development settings")
	assert.NotContains(t, log, "sk_test_51Hxyz0example")
	assert.Equal(t, http.StatusOK, doBare(t, http.MethodGet, p.url+"/venues", "", "Authorization", "Bearer k1").status)
	assert.Equal(t, http.StatusUnauthorized, doBare(t, http.MethodGet, p.url+"/venues", "", "Authorization", "Bearer dev-key-a").status)
	p.stop()
}

// TestDevelopmentDefaultsSaySo: with the fake Stripe and nothing set, the
// startup log names the development API keys and webhook secret, and
// says they are for the fake Stripe only.
func TestDevelopmentDefaultsSaySo(t *testing.T) {
	p := start(t)
	log := p.logText()
	assert.Contains(t, log, `level=WARN msg="development settings, public and for the fake Stripe only`)
	assert.Contains(t, log, "api_keys=dev-key-a:tenant-a,dev-key-b:tenant-b")
	assert.Contains(t, log, "webhook_secret=whsec_dev_secret")
	assert.Contains(t, log, "tenants=tenant-a,tenant-b")
	p.stop()

	// A webhook secret of one's own, with the fake: the development keys
	// are still named, the secret is not.
	p = start(t, "STRIPE_WEBHOOK_SECRET=whsec_mine")
	log = p.logText()
	assert.Contains(t, log, "api_keys=dev-key-a:tenant-a,dev-key-b:tenant-b")
	assert.NotContains(t, log, "whsec_dev_secret")
	assert.NotContains(t, log, "whsec_mine")
	p.stop()

	// The test switches show on the startup line.
	p = start(t, "FAKE_STRIPE_LATENCY=5ms", "CHAOS_FAIL_AFTER_STRIPE=1")
	assert.Contains(t, p.logText(), `test_switches="FAKE_STRIPE_LATENCY=5ms CHAOS_FAIL_AFTER_STRIPE=1"`)
	p.stop()
}

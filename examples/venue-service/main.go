// Command venue-service is a small venue API that uses every part of the
// idempotency library the way a production payments service should:
//
//   - POST /venues is wrapped by the Idempotency-Key middleware (records
//     scoped by X-Tenant-ID) and creates a Stripe Connect account with an
//     idempotency key derived from the request's own key, so a retried
//     request never creates a second account;
//   - POST /webhooks/stripe verifies Stripe's signature first and processes
//     each event ID exactly once;
//   - GET /stats shows how often work really happened;
//   - GET /metrics serves the library's OpenTelemetry metrics (package
//     idemotel) through the OpenTelemetry Prometheus exporter.
//
// Without STRIPE_SECRET_KEY it talks to an in-process fake of Stripe's API;
// without REDIS_URL it keeps idempotency records in memory.
//
// Run it with `go run ./examples/venue-service`; `go run
// ./examples/venue-service sign < event.json` prints a Stripe-Signature
// header for a test event.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
	"github.com/stripe/stripe-go/v76/client"
	"github.com/stripe/stripe-go/v76/webhook"
	"go.opentelemetry.io/otel/attribute"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/resource"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/idemotel"
	"github.com/seed70ea8305/idempotency/internal/fakestripe"
)

// devWebhookSecret is the signing secret used when none is configured.
const devWebhookSecret = "whsec_dev_secret"

type config struct {
	addr                 string
	redisURL             string
	webhookSecret        string
	stripeSecretKey      string
	fakeStripeLatency    time.Duration
	chaosFailAfterStripe int
	shutdownTimeout      time.Duration
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "sign" {
		if err := sign(os.Args[2:], os.Stdin, os.Stdout); err != nil {
			fmt.Fprintln(os.Stderr, "sign:", err)
			os.Exit(2)
		}
		return
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	cfg, err := loadConfig(os.Args[1:], os.Getenv)
	if err != nil {
		logger.Error("bad configuration", "error", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg, logger); err != nil {
		logger.Error("venue-service stopped", "error", err)
		os.Exit(1)
	}
}

// loadConfig reads flags, then environment variables, then defaults.
func loadConfig(args []string, getenv func(string) string) (config, error) {
	env := func(name, fallback string) string {
		if v := getenv(name); v != "" {
			return v
		}
		return fallback
	}
	fs := flag.NewFlagSet("venue-service", flag.ContinueOnError)
	cfg := config{shutdownTimeout: 15 * time.Second}
	fs.StringVar(&cfg.addr, "addr", env("ADDR", "127.0.0.1:8080"), "listen address (env ADDR)")
	fs.StringVar(&cfg.redisURL, "redis", env("REDIS_URL", ""), "Redis URL, e.g. redis://127.0.0.1:6379/0; empty: in-memory store (env REDIS_URL)")
	fs.StringVar(&cfg.webhookSecret, "webhook-secret", env("STRIPE_WEBHOOK_SECRET", devWebhookSecret), "Stripe webhook signing secret (env STRIPE_WEBHOOK_SECRET)")
	if err := fs.Parse(args); err != nil {
		return cfg, err
	}
	if fs.NArg() > 0 {
		return cfg, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	cfg.stripeSecretKey = getenv("STRIPE_SECRET_KEY")
	if v := getenv("FAKE_STRIPE_LATENCY"); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d < 0 {
			return cfg, fmt.Errorf("FAKE_STRIPE_LATENCY=%q: want a non-negative Go duration such as 200ms", v)
		}
		cfg.fakeStripeLatency = d
	}
	if v := getenv("CHAOS_FAIL_AFTER_STRIPE"); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 0 {
			return cfg, fmt.Errorf("CHAOS_FAIL_AFTER_STRIPE=%q: want a non-negative integer", v)
		}
		cfg.chaosFailAfterStripe = n
	}
	return cfg, nil
}

// run serves until ctx is cancelled, then lets in-flight requests finish.
func run(ctx context.Context, cfg config, logger *slog.Logger) error {
	store, storeName, closeStore, err := openStore(ctx, cfg.redisURL)
	if err != nil {
		return err
	}
	defer closeStore()

	stripeClient, stripeName, closeStripe := openStripe(cfg)
	defer closeStripe()

	metrics, metricsHandler, closeMetrics, err := openMetrics()
	if err != nil {
		return err
	}
	defer closeMetrics()

	svc := newService(stripeClient, cfg.chaosFailAfterStripe, logger)
	handler, err := svc.routes(store, cfg.webhookSecret, metrics, metricsHandler)
	if err != nil {
		return err
	}

	listener, err := net.Listen("tcp", cfg.addr)
	if err != nil {
		return err
	}
	srv := &http.Server{
		Handler:           handler,
		ReadHeaderTimeout: 5 * time.Second,
		ReadTimeout:       30 * time.Second,
		WriteTimeout:      60 * time.Second,
		IdleTimeout:       2 * time.Minute,
		ErrorLog:          slog.NewLogLogger(logger.Handler(), slog.LevelWarn),
		BaseContext:       func(net.Listener) context.Context { return context.WithoutCancel(ctx) },
	}
	attrs := []any{"addr", "http://" + listener.Addr().String(), "store", storeName, "stripe", stripeName}
	if cfg.webhookSecret == devWebhookSecret {
		attrs = append(attrs, "webhook_secret", devWebhookSecret+" (development default)")
	}
	logger.Info("venue-service listening", attrs...)

	serveErr := make(chan error, 1)
	go func() { serveErr <- srv.Serve(listener) }()
	select {
	case err := <-serveErr:
		return err
	case <-ctx.Done():
	}
	logger.Info("shutting down: finishing in-flight requests", "timeout", cfg.shutdownTimeout)
	shutdownCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), cfg.shutdownTimeout)
	defer cancel()
	if err := srv.Shutdown(shutdownCtx); err != nil {
		return fmt.Errorf("shutdown: %w", err)
	}
	if err := <-serveErr; !errors.Is(err, http.ErrServerClosed) {
		return err
	}
	logger.Info("venue-service stopped cleanly")
	return nil
}

// openStore returns the Redis store when url is set, else the memory store.
func openStore(ctx context.Context, url string) (idempotency.Store, string, func(), error) {
	if url == "" {
		return idempotency.NewMemoryStore(), "memory", func() {}, nil
	}
	opt, err := redis.ParseURL(url)
	if err != nil {
		return nil, "", nil, fmt.Errorf("REDIS_URL: %w", err)
	}
	// Let each store call be bounded by its context's deadline.
	opt.ContextTimeoutEnabled = true
	// Maintenance notifications need Redis 8; older servers refuse the
	// handshake and go-redis would log about it.
	opt.MaintNotificationsConfig = &maintnotifications.Config{Mode: maintnotifications.ModeDisabled}
	rdb := redis.NewClient(opt)
	pingCtx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	if err := rdb.Ping(pingCtx).Err(); err != nil {
		rdb.Close()
		return nil, "", nil, fmt.Errorf("redis at %s: %w", opt.Addr, err)
	}
	store, err := idempotency.NewRedisStore(rdb, idempotency.WithRedisPrefix("venue-service:idem:"))
	if err != nil {
		rdb.Close()
		return nil, "", nil, err
	}
	return store, "redis " + opt.Addr, func() { rdb.Close() }, nil
}

// openMetrics returns the library's metrics on an OpenTelemetry meter
// provider whose only reader is the Prometheus exporter, and the handler
// of GET /metrics. The exporter registers with a registry of its own, so
// /metrics shows the OpenTelemetry metrics and nothing else.
func openMetrics() (*idemotel.Metrics, http.Handler, func(), error) {
	registry := prometheus.NewRegistry()
	exporter, err := otelprom.New(otelprom.WithRegisterer(registry))
	if err != nil {
		return nil, nil, nil, fmt.Errorf("prometheus exporter: %w", err)
	}
	provider := sdkmetric.NewMeterProvider(sdkmetric.WithReader(exporter),
		sdkmetric.WithResource(resource.NewSchemaless(attribute.String("service.name", "venue-service"))))
	closeProvider := func() { provider.Shutdown(context.Background()) }
	metrics, err := idemotel.New(provider)
	if err != nil {
		closeProvider()
		return nil, nil, nil, err
	}
	return metrics, promhttp.HandlerFor(registry, promhttp.HandlerOpts{}), closeProvider, nil
}

// openStripe returns a client for Stripe's API, or for an in-process fake
// of it when no secret key is configured.
func openStripe(cfg config) (*client.API, string, func()) {
	if cfg.stripeSecretKey != "" {
		return client.New(cfg.stripeSecretKey, nil), "api.stripe.com", func() {}
	}
	_, srv := fakestripe.NewServer(fakestripe.WithLatency(cfg.fakeStripeLatency))
	name := "in-process fake at " + srv.URL
	if cfg.fakeStripeLatency > 0 {
		name += " (latency " + cfg.fakeStripeLatency.String() + ")"
	}
	return fakestripe.NewClient(srv.URL, fakestripe.TestAPIKey), name, srv.Close
}

// sign prints the Stripe-Signature header for the payload on stdin.
func sign(args []string, stdin io.Reader, stdout io.Writer) error {
	fs := flag.NewFlagSet("sign", flag.ContinueOnError)
	secret := fs.String("secret", envOr("STRIPE_WEBHOOK_SECRET", devWebhookSecret), "webhook signing secret")
	if err := fs.Parse(args); err != nil {
		return err
	}
	payload, err := io.ReadAll(stdin)
	if err != nil {
		return err
	}
	signed := webhook.GenerateTestSignedPayload(&webhook.UnsignedPayload{Payload: payload, Secret: *secret, Timestamp: time.Now()})
	_, err = fmt.Fprintln(stdout, signed.Header)
	return err
}

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

// Command venue-service is a small venue API that uses every part of the
// idempotency library the way a production payments service should:
//
//   - POST /venues authenticates the client by its API key
//     (Authorization: Bearer), which names its tenant, then runs behind the
//     Idempotency-Key middleware with records scoped by that tenant; it
//     creates a Stripe Connect account with an idempotency key derived
//     from the request's own key, so a retried request never creates a
//     second account;
//   - POST /webhooks/stripe verifies Stripe's signature first and processes
//     each event ID exactly once;
//   - GET /stats shows how often work really happened;
//   - GET /metrics serves the library's OpenTelemetry metrics (package
//     idemotel) through the OpenTelemetry Prometheus exporter.
//   - with DATABASE_URL and ADMIN_KEY, /admin/webhooks/ serves the webhook
//     inbox's operator API and /admin/console/ the operator console, in a
//     browser (package console).
//
// Without STRIPE_SECRET_KEY it talks to an in-process fake of Stripe's API
// (package stripefake) with public development credentials; with it, it
// refuses to start without STRIPE_WEBHOOK_SECRET and API_KEYS. With
// DATABASE_URL the venues and the idempotency records live in PostgreSQL;
// with REDIS_URL the records live in Redis; else both stay in memory.
// `venue-service -h` lists every setting.
//
// Run it with `go run ./examples/venue-service`; `go run
// ./examples/venue-service sign < event.json` prints a Stripe-Signature
// header for a test event.
//
// To copy the service, leave out testswitches.go and its uses in this file
// (the config's test field): the switches there exist for demonstrations
// and tests.
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
	"strings"
	"syscall"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"github.com/redis/go-redis/v9"
	"github.com/redis/go-redis/v9/maintnotifications"
	"github.com/stripe/stripe-go/v76/client"
	"go.opentelemetry.io/otel/attribute"
	otelprom "go.opentelemetry.io/otel/exporters/prometheus"
	sdkmetric "go.opentelemetry.io/otel/sdk/metric"
	"go.opentelemetry.io/otel/sdk/resource"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/idemotel"
	"github.com/seed70ea8305/idempotency/pgstore"
	"github.com/seed70ea8305/idempotency/pgstore/inbox"
	"github.com/seed70ea8305/idempotency/stripefake"
)

// Development defaults. They are public (they are in this file), so the
// service uses them only with the fake Stripe, and says so at start.
const (
	devWebhookSecret = "whsec_dev_secret"
	// devPartnerSecret is the development secret of the partner's
	// Standard Webhooks deliveries: base64 after whsec_, as the
	// specification's secrets are.
	devPartnerSecret = "whsec_dmVudWUtc2VydmljZSBwYXJ0bmVyIGRldmVsb3BtZW50"
	devAPIKeys       = "dev-key-a:tenant-a,dev-key-b:tenant-b"
)

type config struct {
	addr            string
	redisURL        string
	databaseURL     string
	adminKey        string
	adminRedrive    bool
	webhookSecret   string
	partnerSecret   string
	apiKeys         apiKeys
	stripeSecretKey string
	shutdownTimeout time.Duration
	// dev is set when the service runs against the fake Stripe with the
	// development webhook secret or API keys.
	devWebhookSecret, devAPIKeys bool
	test                         testSwitches
}

// option is one setting: a flag, the environment variable it falls back
// to, and its default.
type option struct {
	flag, env, def, help string
	value                *string
}

func options(webhookSecret, partnerSecret, apiKeys, addr, redisURL, databaseURL, adminKey, adminRedrive *string) []option {
	return []option{
		{"addr", "ADDR", "127.0.0.1:8080", "listen address", addr},
		{"redis", "REDIS_URL", "", "Redis URL, e.g. redis://127.0.0.1:6379/0; unset: records in memory, forgotten on restart", redisURL},
		{"database-url", "DATABASE_URL", "", "PostgreSQL URL, e.g. postgres://user@host/db: the venues and the idempotency records in PostgreSQL (tables created at start), kept across restarts; not with -redis", databaseURL},
		{"webhook-secret", "STRIPE_WEBHOOK_SECRET", "", "Stripe webhook signing secret (whsec_...); unset: " + devWebhookSecret + " with the fake Stripe, required with STRIPE_SECRET_KEY", webhookSecret},
		{"partner-webhook-secret", "PARTNER_WEBHOOK_SECRET", "", "the ticketing partner's Standard Webhooks signing secret (whsec_<base64>) for POST /webhooks/partner; unset: " + devPartnerSecret + ", public, for development", partnerSecret},
		{"api-keys", "API_KEYS", "", "client API keys and their tenants, as key:tenant,key:tenant; unset: " + devAPIKeys + " with the fake Stripe, required with STRIPE_SECRET_KEY", apiKeys},
		{"admin-key", "ADMIN_KEY", "", "admin key of the webhook inbox's operator API under /admin/webhooks/ and of the operator console at /admin/console/ (with DATABASE_URL); unset: neither", adminKey},
		{"admin-redrive", "ADMIN_REDRIVE", "", "1: the operator API and console may redrive failed events (and the console remove unreadable records); unset: read-only", adminRedrive},
	}
}

// usage is the text of -h.
func usage(w io.Writer) {
	var a, b, c, d, e, f, g, h string
	fmt.Fprint(w, `Usage:
  venue-service [flags]
      serve the venue API
  venue-service sign [-secret S] < event.json
      print a Stripe-Signature header for the payload on stdin, signed with
      -secret (env STRIPE_WEBHOOK_SECRET, default `+devWebhookSecret+`)
  venue-service -h
      print this help

Flags (a flag wins over its environment variable):
`)
	for _, o := range options(&a, &b, &c, &d, &e, &f, &g, &h) {
		def := "unset"
		if o.def != "" {
			def = o.def
		}
		fmt.Fprintf(w, "  -%s, env %s (default: %s)\n%s", o.flag, o.env, def, wrap(o.help, "      ", 76))
	}
	fmt.Fprint(w, `
Environment only:
  STRIPE_SECRET_KEY (default: unset)
      Stripe secret key (sk_live_... or sk_test_...): the service calls
      api.stripe.com and needs STRIPE_WEBHOOK_SECRET and API_KEYS. Unset: an
      in-process fake of Stripe's API, with development defaults. Not a
      flag: command lines are visible to every user of the machine.

Authentication:
  POST /venues and GET /venues need "Authorization: Bearer <api key>"; the
  key names the tenant, whose idempotency records and venues are its own.
  Without a valid key: 401. GET /healthz, /stats and /metrics are open
  (keep them off the public network); POST /webhooks/stripe is
  authenticated by its Stripe-Signature header.

`)
	testSwitchesUsage(w)
}

// wrap breaks text into indented lines of at most width columns.
func wrap(text, indent string, width int) string {
	var b strings.Builder
	line := indent
	for _, word := range strings.Fields(text) {
		if line != indent && len(line)+1+len(word) > width {
			b.WriteString(line + "\n")
			line = indent
		}
		if line != indent {
			line += " "
		}
		line += word
	}
	return b.String() + line + "\n"
}

func main() {
	if len(os.Args) > 1 && os.Args[1] == "sign" {
		err := sign(os.Args[2:], os.Stdin, os.Stdout)
		switch {
		case errors.Is(err, flag.ErrHelp):
			return
		case err != nil:
			fmt.Fprintln(os.Stderr, "sign:", err)
			os.Exit(2)
		}
		return
	}
	logger := slog.New(slog.NewTextHandler(os.Stderr, nil))
	cfg, err := loadConfig(os.Args[1:], os.Getenv)
	if errors.Is(err, flag.ErrHelp) {
		usage(os.Stdout)
		return
	}
	if err != nil {
		logger.Error("bad configuration (venue-service -h lists the settings)", "error", err)
		os.Exit(2)
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, cfg, logger); err != nil {
		logger.Error("venue-service stopped", "error", err)
		os.Exit(1)
	}
}

// loadConfig reads flags, then environment variables, then defaults. It
// returns flag.ErrHelp for -h.
func loadConfig(args []string, getenv func(string) string) (config, error) {
	fs := flag.NewFlagSet("venue-service", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // main prints the usage or the error
	cfg := config{shutdownTimeout: 15 * time.Second}
	var webhookSecret, apiKeysText, adminRedrive string
	for _, o := range options(&webhookSecret, &cfg.partnerSecret, &apiKeysText, &cfg.addr, &cfg.redisURL, &cfg.databaseURL, &cfg.adminKey, &adminRedrive) {
		def := o.def
		if v := getenv(o.env); v != "" {
			def = v
		}
		fs.StringVar(o.value, o.flag, def, o.help)
	}
	if err := fs.Parse(args); err != nil {
		return cfg, err
	}
	if fs.NArg() > 0 {
		return cfg, fmt.Errorf("unexpected arguments %q (the only subcommand is sign)", fs.Args())
	}
	switch adminRedrive {
	case "", "0":
	case "1":
		cfg.adminRedrive = true
	default:
		return cfg, fmt.Errorf("ADMIN_REDRIVE (-admin-redrive) is %q: want 1 or unset", adminRedrive)
	}
	if cfg.adminKey != "" && cfg.databaseURL == "" {
		return cfg, errors.New("ADMIN_KEY (-admin-key) needs DATABASE_URL: the operator API is the webhook inbox's")
	}
	if cfg.redisURL != "" && cfg.databaseURL != "" {
		return cfg, errors.New("REDIS_URL (-redis) and DATABASE_URL (-database-url) are both set: choose where the records live")
	}
	cfg.stripeSecretKey = getenv("STRIPE_SECRET_KEY")
	test, err := loadTestSwitches(getenv)
	if err != nil {
		return cfg, err
	}
	cfg.test = test

	if cfg.stripeSecretKey != "" {
		// Real Stripe: no public defaults, no test switches.
		switch {
		case webhookSecret == "":
			return cfg, errors.New("STRIPE_SECRET_KEY is set but STRIPE_WEBHOOK_SECRET (-webhook-secret) is not: set the endpoint's signing secret (whsec_...) from the Stripe dashboard")
		case webhookSecret == devWebhookSecret:
			return cfg, errors.New("STRIPE_WEBHOOK_SECRET is the public development secret " + devWebhookSecret + ", which works only with the fake Stripe (STRIPE_SECRET_KEY unset)")
		case apiKeysText == "":
			return cfg, errors.New("STRIPE_SECRET_KEY is set but API_KEYS (-api-keys) is not: give the clients' API keys as key:tenant,key:tenant")
		case test.enabled():
			return cfg, errors.New("the test switches " + testSwitchNames + " work only with the fake Stripe (STRIPE_SECRET_KEY unset)")
		}
	}
	if webhookSecret == "" {
		webhookSecret, cfg.devWebhookSecret = devWebhookSecret, true
	}
	if apiKeysText == "" {
		apiKeysText, cfg.devAPIKeys = devAPIKeys, true
	}
	cfg.webhookSecret = webhookSecret
	if cfg.partnerSecret == "" {
		cfg.partnerSecret = devPartnerSecret
	}
	if cfg.apiKeys, err = parseAPIKeys(apiKeysText); err != nil {
		return cfg, fmt.Errorf("API_KEYS (-api-keys): %w", err)
	}
	return cfg, nil
}

// run serves until ctx is cancelled, then lets in-flight requests finish.
func run(ctx context.Context, cfg config, logger *slog.Logger) error {
	store, venues, storeName, closeStore, err := openStore(ctx, cfg, logger)
	if err != nil {
		return err
	}
	defer closeStore()

	stripeClient, stripeName, closeStripe := openStripe(cfg.stripeSecretKey, cfg.test)
	defer closeStripe()

	metrics, metricsHandler, closeMetrics, err := openMetrics()
	if err != nil {
		return err
	}
	defer closeMetrics()

	svc := newService(stripeClient, venues, cfg.apiKeys, logger)
	cfg.test.apply(svc)
	var pool *pgxpool.Pool
	if pv, ok := venues.(pgVenues); ok {
		pool = pv.pool
	}
	handler, err := svc.routes(ctx, store, pool, cfg, metrics, metricsHandler)
	if err != nil {
		return err
	}
	if pool != nil {
		stopWorker, err := startWorker(ctx, pool, svc, logger)
		if err != nil {
			return err
		}
		defer stopWorker()
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
	if cfg.devWebhookSecret || cfg.devAPIKeys {
		// Never reached with a real Stripe key: loadConfig refuses.
		var dev []any
		if cfg.devAPIKeys {
			dev = append(dev, "api_keys", devAPIKeys)
		}
		if cfg.devWebhookSecret {
			dev = append(dev, "webhook_secret", devWebhookSecret)
		}
		logger.Warn("development settings, public and for the fake Stripe only: set API_KEYS and STRIPE_WEBHOOK_SECRET for real use", dev...)
	}
	attrs := []any{"addr", "http://" + listener.Addr().String(), "store", storeName, "stripe", stripeName, "tenants", cfg.apiKeys.tenants()}
	if cfg.devWebhookSecret {
		attrs = append(attrs, "webhook_secret", devWebhookSecret+" (development default)")
	}
	if cfg.test.enabled() {
		attrs = append(attrs, "test_switches", cfg.test.String())
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

// openStore returns where the idempotency records and the venues live:
// PostgreSQL (both) with DATABASE_URL, Redis (the records) with
// REDIS_URL, else memory.
func openStore(ctx context.Context, cfg config, logger *slog.Logger) (idempotency.Store, venueStore, string, func(), error) {
	switch {
	case cfg.databaseURL != "":
		return openPostgres(ctx, cfg.databaseURL, logger)
	case cfg.redisURL != "":
		store, name, closeStore, err := openRedis(ctx, cfg.redisURL)
		return store, &memoryVenues{}, name, closeStore, err
	}
	return idempotency.NewMemoryStore(idempotency.MemoryOptions{}), &memoryVenues{}, "memory", func() {}, nil
}

// startWorker processes the events the webhook inbox stored, until the
// returned function is called (after the server stopped taking requests).
// Failed events are retried after 200 ms, then ever longer up to 5 s, and
// an event is failed (a dead letter, for the operator API) after 5
// attempts, so a demonstration shows the retries quickly; a production
// service keeps the library's defaults (10 s to 1 h, 10 attempts).
func startWorker(ctx context.Context, pool *pgxpool.Pool, svc *service, logger *slog.Logger) (func(), error) {
	worker, err := inbox.NewWorker(ctx, pool, svc.activity.Worker(svc.handleWebhook), inbox.WorkerOptions{
		BackoffMin:   200 * time.Millisecond,
		BackoffMax:   5 * time.Second,
		MaxAttempts:  5,
		PollInterval: 100 * time.Millisecond,
		Logger:       logger,
	})
	if err != nil {
		return nil, err
	}
	workerCtx, stop := context.WithCancel(context.WithoutCancel(ctx))
	done := make(chan struct{})
	go func() {
		defer close(done)
		if err := worker.Run(workerCtx); err != nil {
			logger.Error("the webhook inbox worker stopped", "error", err)
		}
	}()
	return func() { stop(); <-done }, nil
}

// openPostgres connects, creates the tables (pgstore's and the venues'),
// and starts the cleanup of expired records, which stops with closing.
func openPostgres(ctx context.Context, url string, logger *slog.Logger) (idempotency.Store, venueStore, string, func(), error) {
	pool, err := pgxpool.New(ctx, url)
	if err != nil {
		return nil, nil, "", nil, fmt.Errorf("DATABASE_URL: %w", err)
	}
	setupCtx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	if err := pgstore.Migrate(setupCtx, pool, pgstore.MigrateOptions{}); err != nil {
		pool.Close()
		return nil, nil, "", nil, fmt.Errorf("migrating the idempotency tables: %w", err)
	}
	if err := migrateVenues(setupCtx, pool); err != nil {
		pool.Close()
		return nil, nil, "", nil, fmt.Errorf("creating the venues table: %w", err)
	}
	store, err := pgstore.New(setupCtx, pool, pgstore.Options{Logger: logger})
	if err != nil {
		pool.Close()
		return nil, nil, "", nil, err
	}
	cleanupCtx, stopCleanup := context.WithCancel(context.WithoutCancel(ctx))
	cleaned := make(chan struct{})
	go func() {
		defer close(cleaned)
		if err := store.RunCleanup(cleanupCtx, time.Minute, 1000); err != nil {
			logger.Warn("cleanup of expired idempotency records stopped", "error", err)
		}
	}()
	closeAll := func() {
		stopCleanup()
		<-cleaned
		pool.Close()
	}
	return store, pgVenues{pool: pool, store: store}, "postgres " + pool.Config().ConnConfig.Host, closeAll, nil
}

// openRedis returns the Redis store for url.
func openRedis(ctx context.Context, url string) (idempotency.Store, string, func(), error) {
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
	store, err := idempotency.NewRedisStore(rdb, idempotency.RedisOptions{Prefix: "venue-service:idem:"})
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
func openStripe(secretKey string, test testSwitches) (*client.API, string, func()) {
	if secretKey != "" {
		return client.New(secretKey, nil), "api.stripe.com", func() {}
	}
	_, srv := stripefake.NewServer(stripefake.WithLatency(test.fakeStripeLatency))
	return stripefake.NewClient(srv.URL, stripefake.TestAPIKey), "in-process fake at " + srv.URL, srv.Close
}

// sign prints the Stripe-Signature header for the payload on stdin.
func sign(args []string, stdin io.Reader, stdout io.Writer) error {
	fs := flag.NewFlagSet("sign", flag.ContinueOnError)
	fs.SetOutput(io.Discard) // main prints the error
	secret := fs.String("secret", envOr("STRIPE_WEBHOOK_SECRET", devWebhookSecret), "webhook signing secret (env STRIPE_WEBHOOK_SECRET)")
	fs.Usage = func() {
		fmt.Fprint(stdout, "Usage: venue-service sign [-secret S] < event.json\n\nPrints a Stripe-Signature header for the payload on stdin, signed now.\n\n")
		fs.SetOutput(stdout)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return err
	}
	if fs.NArg() > 0 {
		return fmt.Errorf("unexpected arguments %q: the payload comes on stdin", fs.Args())
	}
	payload, err := io.ReadAll(stdin)
	if err != nil {
		return err
	}
	_, err = fmt.Fprintln(stdout, stripefake.Sign(payload, *secret))
	return err
}

func envOr(name, fallback string) string {
	if v := os.Getenv(name); v != "" {
		return v
	}
	return fallback
}

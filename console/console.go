package console

import (
	"bytes"
	"context"
	"crypto/aes"
	"crypto/cipher"
	"embed"
	"errors"
	"fmt"
	"html/template"
	"io/fs"
	"log/slog"
	"net/http"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/problem"
	"github.com/seed70ea8305/idempotency/pgstore"
	"github.com/seed70ea8305/idempotency/pgstore/inbox"
)

// Options configures the console ([New]). The zero value is a read-only
// console with neither inbox nor records pages (give it a Pool, Records,
// or both), mounted at the root, whose sessions last 8 hours.
type Options struct {
	// Pool is the database of pgstore's tables (pgstore.Migrate): the
	// console shows the webhook inbox's events there, of every provider
	// and scope found in it. Default: nil, no inbox pages.
	Pool *pgxpool.Pool

	// Schema is where pgstore.Migrate created the tables (its
	// MigrateOptions.Schema). A lower-case SQL identifier. Default: "",
	// the search_path.
	Schema string

	// Records is the store whose idempotency records the records page
	// looks up by scope and key, and removes ([idempotency.Inspector];
	// every store of the idempotency module and pgstore implements it).
	// When it is a *pgstore.Store and Pool is set, the page also shows a
	// record's fence, which [idempotency.Record] does not carry.
	// Default: nil, no records page.
	Records idempotency.Inspector

	// Activity, if set, is charted on the overview: requests per minute
	// by outcome, and the worker's failed attempts per minute, as this
	// process saw them. Default: nil, those charts are left out (events
	// processed per minute, from the database, are charted regardless).
	Activity *Activity

	// ReadWrite enables the pages that change state: redrives of failed
	// events ([inbox.Inbox.Redrive], [inbox.Inbox.RedriveType]) and removal
	// of records ([idempotency.Inspector].Remove), each after a
	// confirmation. Default: false, read-only: the pages offer neither,
	// and their POSTs answer 403.
	ReadWrite bool

	// Prefix is the path the console is mounted at, such as
	// "/admin/console": it starts with a slash and does not end with one.
	// Mount the console at Prefix+"/" without stripping it; its links
	// and its cookie's Path include it. Default: "", the root.
	Prefix string

	// SessionTTL is how long a login lasts. At least a minute.
	// Default: 8 hours.
	SessionTTL time.Duration

	// Logger receives logins, refusals and the database's errors (which
	// the pages show only as "the database did not answer"). Default:
	// nil, silent.
	Logger *slog.Logger
}

// defaultSessionTTL is [Options].SessionTTL's default.
const defaultSessionTTL = 8 * time.Hour

var (
	schemaName = regexp.MustCompile(`^[a-z_][a-z0-9_]*$`)
	prefixPath = regexp.MustCompile(`^(/[A-Za-z0-9._~-]+)*$`)
)

// check fills in o's defaults, or says what is wrong with it.
func (o *Options) check() error {
	if o.SessionTTL == 0 {
		o.SessionTTL = defaultSessionTTL
	}
	var errs []error
	if o.Schema != "" && !schemaName.MatchString(o.Schema) {
		errs = append(errs, fmt.Errorf("console: schema %q is not a lower-case SQL identifier", o.Schema))
	}
	if !prefixPath.MatchString(o.Prefix) {
		errs = append(errs, fmt.Errorf("console: prefix %q must be empty or a path such as /admin/console (no trailing slash)", o.Prefix))
	}
	if o.SessionTTL < time.Minute {
		errs = append(errs, fmt.Errorf("console: session TTL %v is shorter than a minute", o.SessionTTL))
	}
	return errors.Join(errs...)
}

// Console is the operator console: an [http.Handler] for the paths under
// [Options].Prefix. It is safe for concurrent use; create it with [New].
type Console struct {
	o       Options
	auth    authenticator
	seal    cipher.AEAD // seals a record's key between the lookup and its removal
	pages   map[string]*template.Template
	sql     statements
	fences  bool // Records is a *pgstore.Store on Pool: read fences
	handler http.Handler

	mu      sync.Mutex
	inboxes map[inboxRef]*inbox.Inbox // read handles, made on first use

	now func() time.Time
}

var _ http.Handler = (*Console)(nil)

// New returns the console for the admin key, which a login must give.
// With a Pool it checks, in one round trip under ctx, that pgstore's
// tables are there at the migration the inbox needs, and fails otherwise,
// with an error wrapping pgstore.ErrNotMigrated when they are missing or
// old. An empty key or an invalid option fails before anything is sent.
func New(ctx context.Context, key string, opts Options) (*Console, error) {
	if key == "" {
		return nil, errors.New("console: the admin key is empty: set one (a long random string), or do not mount the console")
	}
	if err := opts.check(); err != nil {
		return nil, err
	}
	c := &Console{o: opts, auth: newAuthenticator(key, opts), inboxes: map[inboxRef]*inbox.Inbox{}, now: time.Now}
	block, err := aes.NewCipher(c.auth.derive("record handle"))
	if err != nil {
		return nil, err
	}
	if c.seal, err = cipher.NewGCM(block); err != nil {
		return nil, err
	}
	if c.pages, err = parsePages(); err != nil {
		return nil, err
	}
	if opts.Pool != nil {
		c.sql = newStatements(opts.Schema)
		// A handle that names no provider's events checks the tables.
		if _, err := c.inbox(ctx, inboxRef{Provider: "console"}); err != nil {
			return nil, err
		}
		_, isPG := opts.Records.(*pgstore.Store)
		c.fences = isPG
	}
	c.handler = c.routes()
	return c, nil
}

// ServeHTTP serves the console's pages under [Options].Prefix, and 404
// for any other path.
func (c *Console) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	c.handler.ServeHTTP(w, r)
}

func (c *Console) routes() http.Handler {
	mux := http.NewServeMux()
	p := c.o.Prefix
	mux.HandleFunc("GET "+p+"/login", c.loginPage)
	mux.HandleFunc("POST "+p+"/login", c.login)
	mux.Handle("GET "+p+"/static/", http.StripPrefix(p+"/static/", http.FileServerFS(mustSub(staticFS, "static"))))
	private := http.NewServeMux()
	private.HandleFunc("POST "+p+"/logout", c.logout)
	private.HandleFunc("GET "+p+"/{$}", c.overview)
	if c.o.Pool != nil {
		private.HandleFunc("GET "+p+"/events", c.events)
		private.HandleFunc("GET "+p+"/event", c.event)
		private.HandleFunc("GET "+p+"/event/redrive", c.confirmRedriveOne)
		private.HandleFunc("POST "+p+"/event/redrive", c.redriveOne)
		private.HandleFunc("GET "+p+"/events/redrive", c.confirmRedriveSet)
		private.HandleFunc("POST "+p+"/events/redrive", c.redriveSet)
	}
	if c.o.Records != nil {
		private.HandleFunc("GET "+p+"/records", c.recordsPage)
		private.HandleFunc("POST "+p+"/records", c.lookup)
		private.HandleFunc("POST "+p+"/records/remove", c.remove)
	}
	mux.Handle(p+"/", c.requireSession(private))
	if p != "" {
		mux.HandleFunc("GET "+p, func(w http.ResponseWriter, r *http.Request) {
			http.Redirect(w, r, p+"/", http.StatusSeeOther)
		})
	}
	cop := http.NewCrossOriginProtection()
	cop.SetDenyHandler(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		c.log(r.Context(), slog.LevelWarn, "console: cross-origin request refused", "method", r.Method, "path", r.URL.Path)
		c.fail(w, r, http.StatusForbidden, "Forbidden", "Cross-origin requests are refused.")
	}))
	return securityHeaders(cop.Handler(mux))
}

// securityHeaders sets, on every answer: a Content-Security-Policy that
// allows no script, styles and images from the console only, forms posted
// to the console only, and no framing; no caching; no MIME sniffing; no
// referrer.
func securityHeaders(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		h := w.Header()
		h.Set("Content-Security-Policy", contentSecurityPolicy)
		h.Set("X-Content-Type-Options", "nosniff")
		h.Set("X-Frame-Options", "DENY")
		h.Set("Referrer-Policy", "no-referrer")
		h.Set("Cross-Origin-Opener-Policy", "same-origin")
		h.Set("Cache-Control", "no-store")
		next.ServeHTTP(w, r)
	})
}

// contentSecurityPolicy is the console's policy: nothing is allowed but
// its own stylesheet, its own forms and inline SVG (which is markup, not
// a resource).
const contentSecurityPolicy = "default-src 'none'; style-src 'self'; img-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"

//go:embed templates/*.html
var templateFS embed.FS

//go:embed static
var staticFS embed.FS

func mustSub(f fs.FS, dir string) fs.FS {
	sub, err := fs.Sub(f, dir)
	if err != nil {
		panic(err) // an embedded directory that is there by construction
	}
	return sub
}

// funcs are the templates' helpers.
var funcs = template.FuncMap{
	"when": func(t time.Time) string {
		if t.IsZero() {
			return "—"
		}
		return t.UTC().Format("2006-01-02 15:04:05.000 UTC")
	},
	"ago":      ago,
	"duration": roundDuration,
	"short": func(s string, n int) string {
		if len(s) <= n {
			return s
		}
		return strings.ToValidUTF8(s[:n], "") + "…"
	},
	"bytes": func(n int) string {
		switch {
		case n < 1<<10:
			return strconv.Itoa(n) + " B"
		case n < 1<<20:
			return strconv.FormatFloat(float64(n)/(1<<10), 'f', 1, 64) + " KiB"
		}
		return strconv.FormatFloat(float64(n)/(1<<20), 'f', 1, 64) + " MiB"
	},
}

// parsePages parses every page with the layout.
func parsePages() (map[string]*template.Template, error) {
	layout, err := template.New("layout.html").Funcs(funcs).ParseFS(templateFS, "templates/layout.html", "templates/chart.html")
	if err != nil {
		return nil, err
	}
	names, err := fs.Glob(templateFS, "templates/*.html")
	if err != nil {
		return nil, err
	}
	pages := map[string]*template.Template{}
	for _, name := range names {
		base := strings.TrimPrefix(name, "templates/")
		if base == "layout.html" || base == "chart.html" {
			continue
		}
		t, err := template.Must(layout.Clone()).ParseFS(templateFS, name)
		if err != nil {
			return nil, err
		}
		pages[strings.TrimSuffix(base, ".html")] = t
	}
	return pages, nil
}

// page is what every page's template gets.
type page struct {
	Title     string
	Prefix    string
	Nav       string // the section the page belongs to
	CSRF      string // empty when not logged in
	ReadWrite bool
	Inbox     bool // the inbox pages exist
	Records   bool // the records page exists
	Data      any
}

// render writes the page name with status.
func (c *Console) render(w http.ResponseWriter, r *http.Request, status int, name, title, nav string, data any) {
	p := page{Title: title, Prefix: c.o.Prefix, Nav: nav, ReadWrite: c.o.ReadWrite, Inbox: c.o.Pool != nil,
		Records: c.o.Records != nil, Data: data}
	if s, ok := sessionFrom(r.Context()); ok {
		p.CSRF = c.auth.csrfToken(s)
	}
	var buf bytes.Buffer
	if err := c.pages[name].ExecuteTemplate(&buf, "layout.html", p); err != nil {
		c.log(r.Context(), slog.LevelError, "console: rendering a page", "page", name, "error", err)
		http.Error(w, "Internal error", http.StatusInternalServerError)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Content-Length", strconv.Itoa(buf.Len()))
	w.WriteHeader(status)
	_, _ = w.Write(buf.Bytes())
}

// fail is the console's one error answer: an HTML page with fixed text
// for a browser, application/problem+json for any other client.
func (c *Console) fail(w http.ResponseWriter, r *http.Request, status int, title, detail string) {
	if !strings.Contains(r.Header.Get("Accept"), "text/html") {
		retryAfter := ""
		if status == http.StatusServiceUnavailable {
			retryAfter = "1"
		}
		problem.Write(w, problem.Problem{Title: title, Status: status, Detail: detail}, retryAfter)
		return
	}
	c.render(w, r, status, "error", title, "", struct{ Title, Detail string }{title, detail})
}

// unavailable answers 503 for a database or store that failed, and logs
// the error, which the page does not show.
func (c *Console) unavailable(w http.ResponseWriter, r *http.Request, what string, err error) {
	c.log(r.Context(), slog.LevelError, "console: "+what, "error", err)
	c.fail(w, r, http.StatusServiceUnavailable, "Unavailable", "The database did not answer. Try again.")
}

func (c *Console) log(ctx context.Context, level slog.Level, msg string, args ...any) {
	if c.o.Logger != nil {
		c.o.Logger.Log(ctx, level, msg, args...)
	}
}

// ago says how long ago t was, coarsely.
func ago(now, t time.Time) string {
	if t.IsZero() {
		return ""
	}
	d := now.Sub(t)
	if d < 0 {
		return "in " + roundDuration(-d)
	}
	return roundDuration(d) + " ago"
}

// roundDuration shows d to a precision that fits its size.
func roundDuration(d time.Duration) string {
	switch {
	case d < time.Millisecond:
		return d.Round(time.Microsecond).String()
	case d < time.Second:
		return d.Round(100 * time.Microsecond).String()
	case d < time.Minute:
		return d.Round(10 * time.Millisecond).String()
	case d < 48*time.Hour:
		return d.Round(time.Second).String()
	}
	return strconv.Itoa(int(d/(24*time.Hour))) + "d"
}

package console

// The records page: one idempotency record looked up by its kind, scope
// and key, through [idempotency.Inspector]. The key is a secret of sorts
// (whoever holds it can fetch the stored response through the API), so it
// travels in POST bodies only, is never written into a page (the page
// names the record by its key_hash), and reaches the removal step sealed.

import (
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"log/slog"
	"net/http"
	"regexp"
	"slices"
	"time"

	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/internal/recordkey"
	"github.com/seed70ea8305/idempotency/internal/wire"
)

// recordKind is a record kind: "http" for the middleware's,
// "<provider>-webhook" for the webhook helper's.
var recordKind = regexp.MustCompile(`^[a-z0-9][a-z0-9._-]{0,63}$`)

// Bounds of the lookup form's fields: a key as the middleware accepts it
// is at most 255 bytes; scopes are the application's (a tenant ID).
const (
	maxKeyBytes   = 1024
	maxScopeBytes = 1024
)

// kinds are the record kinds the form proposes: the middleware's and the
// webhook helper's of the providers the library verifies.
var kinds = []string{"http", "stripe-webhook", "standard-webhooks-webhook", "github-webhook"}

// recordQuery is one record's name.
type recordQuery struct {
	Kind, Scope, Key string
}

func (q recordQuery) storeKey() string { return recordkey.Name(q.Kind, q.Scope, q.Key) }

// keyHash is how pages and logs name the key: the first 16 hex digits of
// its SHA-256, as the middleware's log does.
func keyHash(key string) string {
	sum := sha256.Sum256([]byte(key))
	return hex.EncodeToString(sum[:8])
}

// readRecordQuery reads the lookup form; the message says what is wrong.
func readRecordQuery(r *http.Request) (recordQuery, string) {
	q := recordQuery{Kind: r.PostForm.Get("kind"), Scope: r.PostForm.Get("scope"), Key: r.PostForm.Get("key")}
	switch {
	case !recordKind.MatchString(q.Kind):
		return q, "The kind is http, or <provider>-webhook such as stripe-webhook."
	case q.Key == "":
		return q, "Give the key (the Idempotency-Key, or the webhook's event ID)."
	case len(q.Key) > maxKeyBytes || len(q.Scope) > maxScopeBytes:
		return q, "The key or the scope is too long."
	}
	return q, ""
}

type recordsData struct {
	Kinds   []string
	Kind    string
	Scope   string
	Message string // why the form was refused
	Removed string // the key_hash of the record just removed
	Result  *recordView
}

// recordView is what the page shows of a looked-up record.
type recordView struct {
	Kind, Scope, KeyHash string
	State                string // "absent", "in flight", "suspended", "completed", "unreadable"
	Unreadable           string // the decoder's reason
	CreatedAt            time.Time
	LeaseLeft            time.Duration
	Fence                int64
	HasFence             bool
	Fingerprint          string
	RecoveryPoint        string
	RecoveryDataLen      int
	Status               int
	StatusText           string
	Headers              []headerLine
	BodyLen              int
	BodyOmitted          bool
	Handle               string // the sealed query, for the removal form
}

type headerLine struct{ Name, Value string }

func (c *Console) recordsPage(w http.ResponseWriter, r *http.Request) {
	c.render(w, r, http.StatusOK, "records", "Records", "records", recordsData{Kinds: kinds, Kind: "http"})
}

// lookup shows the record the form names.
func (c *Console) lookup(w http.ResponseWriter, r *http.Request) {
	q, msg := readRecordQuery(r)
	d := recordsData{Kinds: kinds, Kind: q.Kind, Scope: q.Scope, Message: msg}
	if msg != "" {
		c.render(w, r, http.StatusBadRequest, "records", "Records", "records", d)
		return
	}
	ctx := r.Context()
	v := &recordView{Kind: q.Kind, Scope: q.Scope, KeyHash: keyHash(q.Key)}
	rec, err := c.o.Records.Get(ctx, q.storeKey())
	switch {
	case errors.Is(err, idempotency.ErrRecordUnreadable):
		v.State, v.Unreadable = "unreadable", err.Error()
	case err != nil:
		c.unavailable(w, r, "reading a record", err)
		return
	case rec == nil:
		v.State = "absent"
	default:
		v.CreatedAt, v.RecoveryPoint, v.RecoveryDataLen = rec.CreatedAt, rec.RecoveryPoint, len(rec.RecoveryData)
		v.Fingerprint = rec.Fingerprint
		switch {
		case rec.Response != nil:
			v.State = "completed"
			v.Status, v.StatusText = rec.Response.StatusCode, http.StatusText(rec.Response.StatusCode)
			v.BodyLen, v.BodyOmitted = len(rec.Response.Body), rec.Response.BodyOmitted
			for _, name := range slices.Sorted(func(yield func(string) bool) {
				for k := range rec.Response.Header {
					if !yield(k) {
						return
					}
				}
			}) {
				for _, value := range rec.Response.Header[name] {
					v.Headers = append(v.Headers, headerLine{name, value})
				}
			}
		case rec.Token != "":
			v.State, v.LeaseLeft = "in flight", rec.LeaseLeft
		default:
			v.State = "suspended"
		}
	}
	if c.fences && v.State != "absent" {
		fence, ok, err := c.fence(ctx, q.storeKey())
		if err != nil {
			c.unavailable(w, r, "reading a record's fence", err)
			return
		}
		v.Fence, v.HasFence = fence, ok
	}
	if c.o.ReadWrite && v.State == "unreadable" {
		s, _ := sessionFrom(ctx)
		v.Handle = c.sealQuery(s, q)
	}
	d.Result = v
	c.render(w, r, http.StatusOK, "records", "Record "+v.KeyHash, "records", d)
}

type confirmRemoveData struct {
	Kind, Scope, KeyHash, Handle string
}

// remove asks for a confirmation of a removal, then removes: the form
// carries the sealed query from lookup, and confirm=yes the second time.
func (c *Console) remove(w http.ResponseWriter, r *http.Request) {
	if c.refuseReadOnly(w, r) {
		return
	}
	ctx := r.Context()
	s, _ := sessionFrom(ctx)
	handle := r.PostForm.Get("handle")
	q, ok := c.openQuery(s, handle)
	if !ok {
		c.fail(w, r, http.StatusBadRequest, "Bad request", "Look the record up again: this removal form is not from this session.")
		return
	}
	hash := keyHash(q.Key)
	if r.PostForm.Get("confirm") != "yes" {
		c.render(w, r, http.StatusOK, "confirm-remove", "Remove record "+hash+"?", "records",
			confirmRemoveData{Kind: q.Kind, Scope: q.Scope, KeyHash: hash, Handle: handle})
		return
	}
	if err := c.o.Records.Remove(ctx, q.storeKey()); err != nil {
		c.unavailable(w, r, "removing a record", err)
		return
	}
	c.log(ctx, slog.LevelInfo, "console: record removed", "kind", q.Kind, "scope", q.Scope, "key_hash", hash)
	c.render(w, r, http.StatusOK, "records", "Records", "records", recordsData{Kinds: kinds, Kind: q.Kind, Scope: q.Scope, Removed: hash})
}

// sealQuery encrypts q for session s, so that the removal form carries
// the key without showing it, and only this session can use it.
func (c *Console) sealQuery(s session, q recordQuery) string {
	plain := wire.AppendString(nil, q.Kind)
	plain = wire.AppendString(plain, q.Scope)
	plain = wire.AppendString(plain, q.Key)
	nonce := make([]byte, c.seal.NonceSize(), c.seal.NonceSize()+len(plain)+c.seal.Overhead())
	_, _ = rand.Read(nonce)
	return b64.EncodeToString(c.seal.Seal(nonce, nonce, plain, s.id))
}

// openQuery reverses sealQuery for the same session.
func (c *Console) openQuery(s session, handle string) (recordQuery, bool) {
	sealed, err := b64.DecodeString(handle)
	if err != nil || len(sealed) < c.seal.NonceSize() {
		return recordQuery{}, false
	}
	n := c.seal.NonceSize()
	plain, err := c.seal.Open(nil, sealed[:n], sealed[n:], s.id)
	if err != nil {
		return recordQuery{}, false
	}
	d := wire.Decoder{B: string(plain)}
	q := recordQuery{Kind: d.String(), Scope: d.String(), Key: d.String()}
	if d.Err != nil || len(d.B) != 0 || !recordKind.MatchString(q.Kind) || q.Key == "" {
		return recordQuery{}, false
	}
	return q, true
}

package console

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"log/slog"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"sync"
	"time"

	"github.com/seed70ea8305/idempotency/pgstore/inbox"
)

// pageSize is how many events a page of the list shows.
const pageSize = 50

// maxRedriveByID bounds the events a filtered redrive makes pending one
// by one (when the filter has an object or an age, which
// [inbox.Inbox.RedriveType] cannot express); the page says when more are
// left.
const maxRedriveByID = 1000

// ages are the choices of the age filter: events received longer ago
// than this.
var ages = []struct{ Value, Label string }{
	{"", "any age"}, {"5m", "older than 5 min"}, {"1h", "older than 1 h"}, {"24h", "older than 24 h"}, {"168h", "older than 7 d"},
}

// filterForm is the events filter as the page's form and links carry it.
type filterForm struct {
	Inbox, Status, Type, Object, Age, Before string
}

func (f filterForm) values() url.Values {
	v := url.Values{}
	for _, kv := range [][2]string{{"inbox", f.Inbox}, {"status", f.Status}, {"type", f.Type}, {"object", f.Object}, {"age", f.Age}, {"before", f.Before}} {
		if kv[1] != "" {
			v.Set(kv[0], kv[1])
		}
	}
	return v
}

func (c *Console) url(path string, v url.Values) string {
	if len(v) == 0 {
		return c.o.Prefix + path
	}
	return c.o.Prefix + path + "?" + v.Encode()
}

func (c *Console) eventURL(ref inboxRef, id string) string {
	return c.url("/event", url.Values{"inbox": {ref.ID()}, "id": {id}})
}

// parseFilter reads the filter of the events page from v.
func (c *Console) parseFilter(v url.Values) (filterForm, listFilter, error) {
	ff := filterForm{Inbox: v.Get("inbox"), Status: v.Get("status"), Type: v.Get("type"), Object: v.Get("object"),
		Age: v.Get("age"), Before: v.Get("before")}
	f := listFilter{Status: ff.Status, Type: ff.Type, Object: ff.Object}
	if ff.Inbox != "" {
		ref, ok := parseInboxRef(ff.Inbox)
		if !ok {
			return ff, f, errors.New("inbox must be provider:scope")
		}
		f.Inbox = ref
	}
	if f.Status != "" && !inbox.ValidStatus(f.Status) {
		return ff, f, errors.New("status must be pending, processing, processed or failed")
	}
	if ff.Before != "" {
		t, err := time.Parse(time.RFC3339Nano, ff.Before)
		if err != nil {
			return ff, f, errors.New("before must be an RFC 3339 time")
		}
		f.Before = t
	}
	if ff.Age != "" {
		if !slices.ContainsFunc(ages, func(a struct{ Value, Label string }) bool { return a.Value == ff.Age }) {
			return ff, f, errors.New("age must be one of the choices")
		}
		d, _ := time.ParseDuration(ff.Age)
		if limit := c.now().Add(-d); f.Before.IsZero() || limit.Before(f.Before) {
			f.Before = limit
		}
	}
	return ff, f, nil
}

// refs returns the inboxes f is about: the one it names, or every inbox
// that holds events.
func (c *Console) refs(ctx context.Context, f listFilter) ([]inboxRef, error) {
	if f.Inbox != (inboxRef{}) {
		return []inboxRef{f.Inbox}, nil
	}
	return c.inboxRefs(ctx)
}

// list returns up to limit events that f selects, newest first: through
// [inbox.Inbox.List] of each inbox, merged, unless f names an object,
// which only the console's own query can filter by.
func (c *Console) list(ctx context.Context, f listFilter, limit int) ([]listedEvent, error) {
	if f.Object != "" {
		return c.objectEvents(ctx, f, limit)
	}
	refs, err := c.refs(ctx, f)
	if err != nil {
		return nil, err
	}
	var out []listedEvent
	for _, ref := range refs {
		in, err := c.inbox(ctx, ref)
		if err != nil {
			return nil, err
		}
		events, err := in.List(ctx, inbox.Filter{Status: f.Status, Type: f.Type, Before: f.Before, Limit: limit})
		if err != nil {
			return nil, err
		}
		for _, e := range events {
			out = append(out, listedEvent{Inbox: ref, EventInfo: e})
		}
	}
	slices.SortStableFunc(out, func(a, b listedEvent) int {
		return cmp.Or(b.ReceivedAt.Compare(a.ReceivedAt), cmp.Compare(a.Provider, b.Provider), cmp.Compare(a.ID, b.ID))
	})
	return out[:min(len(out), limit)], nil
}

type inboxStats struct {
	Ref                 inboxRef
	inbox.Stats         // through the inbox's API
	URL, FailedURL      string
	PendingURL, DoneURL string
}

type typeRow struct {
	typeCount
	URL, FailedURL string
}

type overviewData struct {
	Now     time.Time
	Inboxes []inboxStats
	Types   []typeRow
	Charts  []chart
}

func (c *Console) overview(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	now := c.now()
	var d overviewData
	d.Now = now
	if c.o.Pool != nil {
		refs, err := c.inboxRefs(ctx)
		if err != nil {
			c.unavailable(w, r, "listing the inboxes", err)
			return
		}
		// The counts and the timeline each read the whole table: run them
		// side by side, on connections of their own.
		stats := make([]inbox.Stats, len(refs))
		var counts []typeCount
		var processed []int64
		jobs := []func() error{
			func() (err error) { counts, err = c.typeCounts(ctx); return err },
			func() (err error) { processed, err = c.processedPerMinute(ctx, now); return err },
		}
		for i, ref := range refs {
			jobs = append(jobs, func() error {
				in, err := c.inbox(ctx, ref)
				if err == nil {
					stats[i], err = in.Stats(ctx)
				}
				return err
			})
		}
		if err := parallel(jobs); err != nil {
			c.unavailable(w, r, "reading the counts", err)
			return
		}
		for i, ref := range refs {
			link := func(status string) string {
				return c.url("/events", filterForm{Inbox: ref.ID(), Status: status}.values())
			}
			d.Inboxes = append(d.Inboxes, inboxStats{Ref: ref, Stats: stats[i], URL: link(""), FailedURL: link(inbox.StatusFailed),
				PendingURL: link(inbox.StatusPending), DoneURL: link(inbox.StatusProcessed)})
		}
		for _, tc := range counts {
			link := func(status string) string {
				return c.url("/events", filterForm{Inbox: tc.Inbox.ID(), Type: tc.Type, Status: status}.values())
			}
			d.Types = append(d.Types, typeRow{typeCount: tc, URL: link(""), FailedURL: link(inbox.StatusFailed)})
		}
		webhooks := []series{{Name: "processed (database: every worker)", Class: "s-ok", Counts: processed}}
		if c.o.Activity != nil {
			_, failed := c.o.Activity.worker(now)
			webhooks = append(webhooks, series{Name: "failed attempts (this process's workers)", Class: "s-fail", Counts: failed})
		}
		d.Charts = append(d.Charts, newChart("Webhook events per minute, last 24 hours", now, webhooks))
	}
	if c.o.Activity != nil {
		d.Charts = append(d.Charts, newChart("Requests per minute by outcome, last 24 hours (this process)", now, c.o.Activity.requests(now)))
	}
	c.render(w, r, http.StatusOK, "overview", "Overview", "overview", d)
}

type eventsData struct {
	Now        time.Time
	Filter     filterForm
	Inboxes    []inboxRef
	Statuses   []string
	Ages       []struct{ Value, Label string }
	Events     []eventRow
	NextURL    string
	RedriveURL string
	Redriven   string
	Error      string
}

type eventRow struct {
	listedEvent
	URL string
}

func (c *Console) events(w http.ResponseWriter, r *http.Request) {
	ctx := r.Context()
	ff, f, err := c.parseFilter(r.URL.Query())
	d := eventsData{Now: c.now(), Filter: ff, Ages: ages, Redriven: r.URL.Query().Get("redriven"),
		Statuses: []string{inbox.StatusPending, inbox.StatusProcessing, inbox.StatusFailed, inbox.StatusProcessed}}
	if _, err := strconv.Atoi(d.Redriven); err != nil {
		d.Redriven = ""
	}
	refs, rerr := c.inboxRefs(ctx)
	if rerr != nil {
		c.unavailable(w, r, "listing the inboxes", rerr)
		return
	}
	d.Inboxes = refs
	if err != nil {
		d.Error = err.Error() // the parser's own fixed texts
		c.render(w, r, http.StatusBadRequest, "events", "Events", "events", d)
		return
	}
	events, err := c.list(ctx, f, pageSize+1)
	if err != nil {
		c.unavailable(w, r, "listing events", err)
		return
	}
	if len(events) > pageSize {
		events = events[:pageSize]
		next := ff
		next.Age = ""
		next.Before = events[len(events)-1].ReceivedAt.Format(time.RFC3339Nano)
		d.NextURL = c.url("/events", next.values())
	}
	for _, e := range events {
		d.Events = append(d.Events, eventRow{listedEvent: e, URL: c.eventURL(e.Inbox, e.ID)})
	}
	if c.o.ReadWrite && (f.Status == "" || f.Status == inbox.StatusFailed) {
		set := ff
		set.Status, set.Before = "", ""
		d.RedriveURL = c.url("/events/redrive", set.values())
	}
	nav := "events"
	if f.Status == inbox.StatusFailed {
		nav = "dead"
	}
	c.render(w, r, http.StatusOK, "events", "Events", nav, d)
}

type eventData struct {
	Now        time.Time
	Ref        inboxRef
	Event      inbox.EventInfo
	Payload    string
	PayloadLen int
	Waited     time.Duration // received to processed, or to now
	RedriveURL string
	Redriven   bool
}

// eventFrom reads the inbox and ID that v names, and the event; it has
// answered when ok is false.
func (c *Console) eventFrom(w http.ResponseWriter, r *http.Request, v url.Values) (inboxRef, inbox.EventInfo, bool) {
	ref, ok := parseInboxRef(v.Get("inbox"))
	id := v.Get("id")
	if !ok || id == "" {
		c.fail(w, r, http.StatusBadRequest, "Bad request", "An event is named by its inbox (provider:scope) and its ID.")
		return ref, inbox.EventInfo{}, false
	}
	in, err := c.inbox(r.Context(), ref)
	if err != nil {
		c.unavailable(w, r, "opening an inbox", err)
		return ref, inbox.EventInfo{}, false
	}
	e, err := in.Event(r.Context(), id)
	switch {
	case errors.Is(err, inbox.ErrEventNotFound):
		c.fail(w, r, http.StatusNotFound, "Not found", "No such event in this inbox.")
		return ref, e, false
	case err != nil:
		c.unavailable(w, r, "reading an event", err)
		return ref, e, false
	}
	return ref, e, true
}

func (c *Console) event(w http.ResponseWriter, r *http.Request) {
	ref, e, ok := c.eventFrom(w, r, r.URL.Query())
	if !ok {
		return
	}
	now := c.now()
	d := eventData{Now: now, Ref: ref, Event: e, PayloadLen: len(e.Payload), Redriven: r.URL.Query().Get("redriven") == "1"}
	var pretty bytes.Buffer
	if err := json.Indent(&pretty, e.Payload, "", "  "); err == nil {
		d.Payload = pretty.String()
	} else {
		d.Payload = string(e.Payload)
	}
	if e.ProcessedAt.IsZero() {
		d.Waited = now.Sub(e.ReceivedAt)
	} else {
		d.Waited = e.ProcessedAt.Sub(e.ReceivedAt)
	}
	if c.o.ReadWrite && e.Status == inbox.StatusFailed {
		d.RedriveURL = c.url("/event/redrive", url.Values{"inbox": {ref.ID()}, "id": {e.ID}})
	}
	c.render(w, r, http.StatusOK, "event", "Event "+e.ID, "events", d)
}

// refuseReadOnly answers 403 when the console is read-only.
func (c *Console) refuseReadOnly(w http.ResponseWriter, r *http.Request) bool {
	if c.o.ReadWrite {
		return false
	}
	c.fail(w, r, http.StatusForbidden, "Read-only", "This console is read-only: redrives and removals are not enabled.")
	return true
}

type confirmOneData struct {
	Ref     inboxRef
	Event   inbox.EventInfo
	BackURL string
}

func (c *Console) confirmRedriveOne(w http.ResponseWriter, r *http.Request) {
	if c.refuseReadOnly(w, r) {
		return
	}
	ref, e, ok := c.eventFrom(w, r, r.URL.Query())
	if !ok {
		return
	}
	c.render(w, r, http.StatusOK, "confirm-redrive", "Redrive "+e.ID+"?", "events",
		confirmOneData{Ref: ref, Event: e, BackURL: c.eventURL(ref, e.ID)})
}

func (c *Console) redriveOne(w http.ResponseWriter, r *http.Request) {
	if c.refuseReadOnly(w, r) {
		return
	}
	ref, ok := parseInboxRef(r.PostForm.Get("inbox"))
	id := r.PostForm.Get("id")
	if !ok || id == "" {
		c.fail(w, r, http.StatusBadRequest, "Bad request", "An event is named by its inbox (provider:scope) and its ID.")
		return
	}
	in, err := c.inbox(r.Context(), ref)
	if err != nil {
		c.unavailable(w, r, "opening an inbox", err)
		return
	}
	switch err := in.Redrive(r.Context(), id); {
	case errors.Is(err, inbox.ErrEventNotFound):
		c.fail(w, r, http.StatusNotFound, "Not found", "No such event in this inbox.")
	case errors.Is(err, inbox.ErrNotFailed):
		c.fail(w, r, http.StatusConflict, "Not failed", "The event is not failed (any more): only dead letters are redriven.")
	case err != nil:
		c.unavailable(w, r, "redriving an event", err)
	default:
		c.log(r.Context(), slog.LevelInfo, "console: event redriven", "provider", ref.Provider, "scope", ref.Scope, "event", id)
		http.Redirect(w, r, c.url("/event", url.Values{"inbox": {ref.ID()}, "id": {id}, "redriven": {"1"}}), http.StatusSeeOther)
	}
}

type confirmSetData struct {
	Filter  filterForm
	Counts  []inboxCount
	Total   int64
	BackURL string
	Fields  [][2]string // the filter, as hidden fields
}

type inboxCount struct {
	Ref inboxRef
	N   int64
}

func (c *Console) confirmRedriveSet(w http.ResponseWriter, r *http.Request) {
	if c.refuseReadOnly(w, r) {
		return
	}
	ff, f, err := c.parseFilter(r.URL.Query())
	if err != nil {
		c.fail(w, r, http.StatusBadRequest, "Bad request", err.Error())
		return
	}
	counts, err := c.failedCounts(r.Context(), f)
	if err != nil {
		c.unavailable(w, r, "counting failed events", err)
		return
	}
	d := confirmSetData{Filter: ff}
	for ref, n := range counts {
		d.Counts = append(d.Counts, inboxCount{ref, n})
		d.Total += n
	}
	slices.SortFunc(d.Counts, func(a, b inboxCount) int { return cmp.Compare(a.Ref.ID(), b.Ref.ID()) })
	back := ff
	back.Status = inbox.StatusFailed
	d.BackURL = c.url("/events", back.values())
	for k, vs := range ff.values() {
		d.Fields = append(d.Fields, [2]string{k, vs[0]})
	}
	slices.SortFunc(d.Fields, func(a, b [2]string) int { return cmp.Compare(a[0], b[0]) })
	c.render(w, r, http.StatusOK, "confirm-redrive-set", "Redrive failed events?", "events", d)
}

// redriveSet makes the failed events of a filter pending again: with
// [inbox.Inbox.RedriveType] per inbox when the filter is a type at most,
// else one by one with [inbox.Inbox.Redrive], up to maxRedriveByID.
func (c *Console) redriveSet(w http.ResponseWriter, r *http.Request) {
	if c.refuseReadOnly(w, r) {
		return
	}
	ctx := r.Context()
	ff, f, err := c.parseFilter(r.PostForm)
	if err != nil {
		c.fail(w, r, http.StatusBadRequest, "Bad request", err.Error())
		return
	}
	f.Status = inbox.StatusFailed
	refs, err := c.refs(ctx, f)
	if err != nil {
		c.unavailable(w, r, "listing the inboxes", err)
		return
	}
	total := 0
	if f.Object == "" && f.Before.IsZero() {
		for _, ref := range refs {
			in, err := c.inbox(ctx, ref)
			if err != nil {
				c.unavailable(w, r, "opening an inbox", err)
				return
			}
			n, err := in.RedriveType(ctx, f.Type)
			total += n
			if err != nil {
				c.unavailable(w, r, "redriving events", err)
				return
			}
		}
	} else {
		events, err := c.list(ctx, f, maxRedriveByID)
		if err != nil {
			c.unavailable(w, r, "listing failed events", err)
			return
		}
		for _, e := range events {
			in, err := c.inbox(ctx, e.Inbox)
			if err == nil {
				err = in.Redrive(ctx, e.ID)
			}
			switch {
			case errors.Is(err, inbox.ErrNotFailed), errors.Is(err, inbox.ErrEventNotFound):
				// Redriven, processed or deleted meanwhile.
			case err != nil:
				c.unavailable(w, r, "redriving events", err)
				return
			default:
				total++
			}
		}
	}
	c.log(ctx, slog.LevelInfo, "console: failed events redriven", "count", total, "inbox", ff.Inbox, "type", ff.Type, "object", ff.Object, "age", ff.Age)
	back := ff
	back.Status, back.Before = "", ""
	v := back.values()
	v.Set("redriven", strconv.Itoa(total))
	http.Redirect(w, r, c.url("/events", v), http.StatusSeeOther)
}

// parallel runs the jobs at once and, once all have returned, their
// errors joined.
func parallel(jobs []func() error) error {
	errs := make([]error, len(jobs))
	var wg sync.WaitGroup
	for i, job := range jobs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = job()
		}()
	}
	wg.Wait()
	return errors.Join(errs...)
}

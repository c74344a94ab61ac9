// Package console is an operator console in the browser for what the
// idempotency library keeps: the webhook inbox of package
// [github.com/seed70ea8305/idempotency/pgstore/inbox] (counts, a filtered
// list, each event with its payload, redrives of dead letters) and the
// idempotency records of any [idempotency.Inspector] (a record looked up
// by its scope and key, its state, and removal of one that cannot be
// read), with charts of the last 24 hours drawn on the server as inline
// SVG. Pages are rendered on the server with html/template and need no
// JavaScript; the console serves none.
//
//	con, err := console.New(ctx, os.Getenv("ADMIN_KEY"), console.Options{
//		Pool:     pool,              // the database of pgstore's tables: the inbox
//		Records:  store,             // a *pgstore.Store, *idempotency.RedisStore, ...
//		Activity: activity,          // optional: per-minute request outcomes and worker attempts
//		Prefix:   "/admin/console",  // where it is mounted
//	})
//	if err != nil {
//		return err
//	}
//	mux.Handle("/admin/console/", con)
//
// With an [Activity], the console also charts what this process saw:
// give its ObserveRequest to the middleware's [idempotency.Options].Observer
// and wrap the inbox worker's function with its Worker method.
//
// # Security
//
// The console has its own authentication, by one admin key: a login form
// that sets a session cookie (HttpOnly, SameSite=Strict, Secure unless the
// browser talks to a loopback address over plain HTTP, scoped to the
// prefix, signed with a secret derived from the key, valid for
// [Options].SessionTTL). Every POST carries a CSRF token bound to the
// session, and cross-origin POSTs are refused besides
// ([http.CrossOriginProtection]). Every answer carries a
// Content-Security-Policy that allows no script at all, styles only from
// the console itself, and no framing. Payloads, errors and headers are
// escaped by html/template: a payload holding <script> shows as text. An
// idempotency key typed into the records page travels in a POST body only,
// is shown back only as its key_hash (the first 16 hex digits of its
// SHA-256, as the middleware's log names it), and is carried to the
// removal step sealed (AES-GCM, bound to the session). The console is
// read-only unless [Options].ReadWrite enables redrives and removals.
//
// # Pages
//
// Relative to [Options].Prefix:
//
//	GET  /                      counts per inbox, status and type; charts
//	GET  /events                the inbox's events, newest first: ?inbox=provider:scope
//	                            &status=&type=&object=&age=1h (older than) &before= (paging)
//	GET  /event?inbox=&id=      one event: payload, attempts, last error, timings
//	GET  /event/redrive?...     confirmation; POST performs it (ReadWrite)
//	GET  /events/redrive?...    confirmation for the failed events of a filter;
//	                            POST performs it (ReadWrite)
//	GET  /records               the lookup form; POST /records looks a record up
//	POST /records/remove        confirmation, then removal (ReadWrite)
//	GET  /login, POST /login, POST /logout
//
// Where the inbox's API has no query for what a page shows (counts per
// type, the object filter, events processed per minute, the inboxes in the
// table), the console reads pgstore's webhook_events table itself; every
// change goes through the inbox's API ([inbox.Inbox.Redrive],
// [inbox.Inbox.RedriveType]) or the store's ([idempotency.Inspector]).
package console

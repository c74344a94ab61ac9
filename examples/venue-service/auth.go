package main

import (
	"context"
	"crypto/sha256"
	"crypto/subtle"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
)

// apiKeys maps the SHA-256 of each client API key to its tenant. Looking
// up the hash rather than the key means the map's comparisons reveal
// nothing about the keys through timing.
type apiKeys map[[sha256.Size]byte]string

// parseAPIKeys reads "key:tenant,key:tenant". Keys are unique; a tenant
// may have several keys (while one is rotated, say).
func parseAPIKeys(text string) (apiKeys, error) {
	keys := apiKeys{}
	for pair := range strings.SplitSeq(text, ",") {
		key, tenant, ok := strings.Cut(strings.TrimSpace(pair), ":")
		key, tenant = strings.TrimSpace(key), strings.TrimSpace(tenant)
		if !ok || key == "" || tenant == "" {
			return nil, errors.New("want key:tenant pairs separated by commas, e.g. k1:tenant-a,k2:tenant-b")
		}
		sum := sha256.Sum256([]byte(key))
		if _, dup := keys[sum]; dup {
			return nil, fmt.Errorf("a key is listed twice (for tenant %q)", tenant)
		}
		keys[sum] = tenant
	}
	return keys, nil
}

// tenants returns the tenants' names, sorted, for the startup line.
func (k apiKeys) tenants() string {
	var names []string
	for _, t := range k {
		names = append(names, t)
	}
	slices.Sort(names)
	return strings.Join(slices.Compact(names), ",")
}

// tenant returns the tenant of the request's bearer token.
func (k apiKeys) tenant(r *http.Request) (string, bool) {
	scheme, token, ok := strings.Cut(r.Header.Get("Authorization"), " ")
	if !ok || !strings.EqualFold(scheme, "Bearer") || token == "" {
		return "", false
	}
	tenant, ok := k[sha256.Sum256([]byte(strings.TrimSpace(token)))]
	return tenant, ok
}

type tenantKey struct{}

// tenantFrom returns the tenant that authenticate put in ctx.
func tenantFrom(ctx context.Context) string {
	tenant, _ := ctx.Value(tenantKey{}).(string)
	return tenant
}

// authenticate lets through requests whose Authorization header carries a
// known API key, with its tenant in the context; others get 401 without
// reaching next. A header naming a tenant (X-Tenant-ID) is ignored: the
// tenant is whoever the key belongs to.
func (s *service) authenticate(next http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tenant, ok := s.apiKeys.tenant(r)
		if !ok {
			w.Header().Set("WWW-Authenticate", `Bearer realm="venue-service"`)
			writeProblem(w, http.StatusUnauthorized, "Unauthorized", "send Authorization: Bearer <api key>")
			return
		}
		next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), tenantKey{}, tenant)))
	})
}

// requireKey lets through only requests that carry key as their bearer
// token; the comparison takes the same time whatever the token.
func requireKey(key string, next http.Handler) http.Handler {
	want := sha256.Sum256([]byte(key))
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		token, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		got := sha256.Sum256([]byte(token))
		if !ok || subtle.ConstantTimeCompare(got[:], want[:]) != 1 {
			w.Header().Set("WWW-Authenticate", `Bearer realm="venue-service admin"`)
			writeProblem(w, http.StatusUnauthorized, "Unauthorized", "send Authorization: Bearer <admin key>")
			return
		}
		next.ServeHTTP(w, r)
	})
}

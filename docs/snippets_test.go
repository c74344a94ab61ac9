package docs_test

// TestSnippetsCompile type-checks every ```go block of README.md and
// docs/*.md against the code as it is, so that no documented snippet can
// rot. A block is checked in one of three ways:
//
//   - a whole file (it starts with a package clause): as it is;
//   - declarations (it parses as the body of a Go file: types, funcs,
//     vars): in a package with the preamble below, its imports filled in;
//   - anything else: as the body of a function returning error, in a
//     package with the preamble, its imports filled in. A fragment may end
//     with "return err" or fall off the end.
//
// Imports are filled in by golang.org/x/tools/imports, preferring the
// packages listed in candidates. Each generated file carries a line
// directive, so an error names the Markdown file and its line. "declared
// and not used" is the only error let through: a fragment may show a
// variable it does not go on to use.

import (
	"bytes"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"go/types"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/tools/go/packages"
	"golang.org/x/tools/imports"
)

// preamble declares the names a snippet may use without declaring them.
// Keep it small and obvious: a reader must be able to guess each one.
const preamble = `
var (
	ctx   context.Context      // the request's or the program's context
	store idempotency.Store    // any store: memory, Redis, PostgreSQL
	mux   *http.ServeMux       // the program's router
	pool  *pgxpool.Pool        // a pgx pool on the application's database
	rdb   *redis.Client        // a go-redis client
	sc    *client.API          // a stripe-go client
	w     http.ResponseWriter  // inside a handler
	r     *http.Request        // inside a handler
)

// tenantOf returns the authenticated tenant of r (set by authenticate).
func tenantOf(r *http.Request) string { return "" }

// authenticate turns away requests without valid credentials (401).
func authenticate(next http.Handler) http.Handler { return next }

// createVenue is the handler being made idempotent.
func createVenue(w http.ResponseWriter, r *http.Request) {}

// syncAccount acts on a Stripe account.updated event.
func syncAccount(ctx context.Context, ev *stripe.Event) error { return nil }
`

// candidates are the imports a snippet may use besides the standard
// library; unused ones are dropped.
const candidates = `
	"github.com/seed70ea8305/idempotency"
	"github.com/seed70ea8305/idempotency/idemclient"
	"github.com/seed70ea8305/idempotency/idemotel"
	"github.com/seed70ea8305/idempotency/pgstore"
	"github.com/seed70ea8305/idempotency/pgstore/inbox"
	"github.com/seed70ea8305/idempotency/pgstore/inbox/admin"
	"github.com/seed70ea8305/idempotency/storetest"
	"github.com/seed70ea8305/idempotency/stripefake"
	pgx "github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	redis "github.com/redis/go-redis/v9"
	stripe "github.com/stripe/stripe-go/v76"
	"github.com/stripe/stripe-go/v76/client"
	"go.opentelemetry.io/otel"
`

// A snippet is one ```go block.
type snippet struct {
	file string // relative to the repository root, as printed
	line int    // of the block's first line of code
	code string
}

func (s snippet) String() string { return fmt.Sprintf("%s:%d", s.file, s.line) }

// markdownFiles returns README.md and docs/*.md, relative to this
// directory, and the names to print for them.
func markdownFiles(t *testing.T) map[string]string {
	t.Helper()
	files := map[string]string{"../README.md": "README.md"}
	docs, err := filepath.Glob("*.md")
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range docs {
		files[f] = "docs/" + f
	}
	return files
}

// extract returns the ```go blocks of a Markdown file.
func extract(name string, text []byte) []snippet {
	var out []snippet
	lines := strings.Split(string(text), "\n")
	for i := 0; i < len(lines); i++ {
		if strings.TrimSpace(lines[i]) != "```go" {
			continue
		}
		indent := lines[i][:len(lines[i])-len(strings.TrimLeft(lines[i], " \t"))]
		start := i + 1
		var body []string
		for i++; i < len(lines) && strings.TrimSpace(lines[i]) != "```"; i++ {
			body = append(body, strings.TrimPrefix(lines[i], indent))
		}
		out = append(out, snippet{file: name, line: start + 1, code: strings.Join(body, "\n") + "\n"})
	}
	return out
}

func allSnippets(t *testing.T) []snippet {
	var all []snippet
	files := markdownFiles(t)
	paths := make([]string, 0, len(files))
	for p := range files {
		paths = append(paths, p)
	}
	slices.Sort(paths)
	for _, p := range paths {
		text, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		all = append(all, extract(files[p], text)...)
	}
	return all
}

// A unit is what gets type-checked for one snippet: one package.
type unit struct {
	snippet
	files map[string][]byte // file name -> source
}

func isWholeFile(code string) bool {
	for _, l := range strings.Split(code, "\n") {
		l = strings.TrimSpace(l)
		if l == "" || strings.HasPrefix(l, "//") {
			continue
		}
		return strings.HasPrefix(l, "package ")
	}
	return false
}

// isDecls reports whether code is a list of top-level declarations.
func isDecls(code string) bool {
	_, err := parser.ParseFile(token.NewFileSet(), "", "package p\n"+code, 0)
	return err == nil
}

// build turns a snippet into the files of its package.
func build(s snippet) (unit, error) {
	u := unit{snippet: s, files: map[string][]byte{}}
	directive := fmt.Sprintf("//line %s:%d\n", s.file, s.line)
	if isWholeFile(s.code) {
		u.files["snippet.go"] = []byte(directive + s.code)
		return u, nil
	}
	var body string
	if isDecls(s.code) {
		body = directive + s.code
	} else {
		body = "func _() error {\n" + directive + s.code + "\n//line snippet.go:1\nreturn nil\n}\n"
	}
	// goimports sees the preamble in the same file, so that its names are
	// not taken for packages; the imports it settles on go to both files,
	// each keeping those it uses.
	draft := "package snippet\n\nimport (" + candidates + ")\n" + preamble + "\n" + body
	fixed, err := imports.Process("snippet.go", []byte(draft), &imports.Options{Comments: true, TabIndent: true, TabWidth: 8})
	if err != nil {
		return u, fmt.Errorf("%s: filling in imports: %v", s, err)
	}
	specs, err := importSpecs(fixed)
	if err != nil {
		return u, fmt.Errorf("%s: %v", s, err)
	}
	u.files["preamble.go"] = []byte(withImports(specs, preamble))
	u.files["snippet.go"] = []byte(withImports(specs, body))
	return u, nil
}

type importSpec struct{ name, path string }

func importSpecs(src []byte) ([]importSpec, error) {
	f, err := parser.ParseFile(token.NewFileSet(), "", src, parser.ImportsOnly)
	if err != nil {
		return nil, err
	}
	var specs []importSpec
	for _, imp := range f.Imports {
		p, _ := strconv.Unquote(imp.Path.Value)
		name := ""
		if imp.Name != nil {
			name = imp.Name.Name
		}
		specs = append(specs, importSpec{name, p})
	}
	return specs, nil
}

// withImports returns a file of package snippet holding decls and those
// of specs that decls refers to.
func withImports(specs []importSpec, decls string) string {
	// A package is used where its name is the X of a selector and does
	// not resolve to a name the file declares (a local "client" is not
	// the package client).
	used := map[string]bool{}
	if f, err := parser.ParseFile(token.NewFileSet(), "", "package p\n"+decls, 0); err == nil {
		ast.Inspect(f, func(n ast.Node) bool {
			if sel, ok := n.(*ast.SelectorExpr); ok {
				if id, ok := sel.X.(*ast.Ident); ok && id.Obj == nil {
					used[id.Name] = true
				}
			}
			return true
		})
	}
	var b strings.Builder
	b.WriteString("package snippet\n\nimport (\n")
	for _, s := range specs {
		name := s.name
		if name == "" {
			name = assumedName(s.path)
		}
		if !used[name] {
			continue
		}
		fmt.Fprintf(&b, "\t%s %q\n", name, s.path)
	}
	b.WriteString(")\n\n")
	b.WriteString(decls)
	return b.String()
}

// assumedName is the package name of an import path given without one:
// the last element, less a major version suffix and a go- prefix, as
// goimports assumes.
func assumedName(path string) string {
	elems := strings.Split(path, "/")
	name := elems[len(elems)-1]
	if len(elems) > 1 && len(name) > 1 && name[0] == 'v' && strings.Trim(name[1:], "0123456789") == "" {
		name = elems[len(elems)-2]
	}
	name = strings.TrimPrefix(name, "go-")
	return strings.NewReplacer("-", "_", ".", "_").Replace(name)
}

// loadImports type-checks, once, every package the units import.
func loadImports(t *testing.T, units []unit) map[string]*types.Package {
	t.Helper()
	paths := map[string]bool{}
	for _, u := range units {
		for _, src := range u.files {
			specs, err := importSpecs(src)
			if err != nil {
				continue // reported when the unit is checked
			}
			for _, s := range specs {
				paths[s.path] = true
			}
		}
	}
	var list []string
	for p := range paths {
		if p != "unsafe" && p != "C" {
			list = append(list, p)
		}
	}
	slices.Sort(list)
	cfg := &packages.Config{Mode: packages.NeedName | packages.NeedTypes | packages.NeedImports}
	pkgs, err := packages.Load(cfg, list...)
	if err != nil {
		t.Fatalf("loading the packages the snippets import: %v", err)
	}
	byPath := map[string]*types.Package{"unsafe": types.Unsafe}
	for _, p := range pkgs {
		for _, e := range p.Errors {
			t.Errorf("loading %s: %v", p.PkgPath, e)
		}
		if p.Types != nil {
			byPath[p.PkgPath] = p.Types
		}
	}
	return byPath
}

// check type-checks one unit and returns its errors, positioned in the
// Markdown file.
func check(u unit, byPath map[string]*types.Package) []string {
	fset := token.NewFileSet()
	var files []*ast.File
	var errs []string
	names := make([]string, 0, len(u.files))
	for name := range u.files {
		names = append(names, name)
	}
	slices.Sort(names)
	for _, name := range names {
		f, err := parser.ParseFile(fset, name, u.files[name], parser.ParseComments)
		if err != nil {
			errs = append(errs, err.Error())
			continue
		}
		files = append(files, f)
	}
	if len(errs) > 0 {
		return errs
	}
	conf := types.Config{
		Importer: importerFunc(func(path string) (*types.Package, error) {
			if p, ok := byPath[path]; ok {
				return p, nil
			}
			return nil, fmt.Errorf("package %q not loaded (is it required by docs/go.mod?)", path)
		}),
		Error: func(err error) {
			te, ok := err.(types.Error)
			if ok && te.Soft && strings.Contains(te.Msg, "declared and not used") {
				return
			}
			errs = append(errs, err.Error())
		},
	}
	conf.Check("snippet", fset, files, nil)
	return errs
}

type importerFunc func(path string) (*types.Package, error)

func (f importerFunc) Import(path string) (*types.Package, error) { return f(path) }

func TestSnippetsCompile(t *testing.T) {
	snippets := allSnippets(t)
	if len(snippets) == 0 {
		t.Fatal("no ```go blocks found")
	}
	var units []unit
	for _, s := range snippets {
		u, err := build(s)
		if err != nil {
			t.Error(err)
			continue
		}
		units = append(units, u)
	}
	byPath := loadImports(t, units)
	for _, u := range units {
		if errs := check(u, byPath); len(errs) > 0 {
			t.Errorf("the snippet at %s does not compile:\n\t%s\n%s", u.snippet, strings.Join(errs, "\n\t"), numbered(u.files["snippet.go"]))
		}
	}
	t.Logf("%d snippets checked", len(units))
}

// numbered returns src with line numbers, for a failure's message.
func numbered(src []byte) string {
	var b bytes.Buffer
	for i, l := range strings.Split(string(src), "\n") {
		fmt.Fprintf(&b, "\t%3d  %s\n", i+1, l)
	}
	return b.String()
}

// TestSnippetCheckerCatchesErrors: the checker itself fails a snippet that
// does not compile, and names its file and line.
func TestSnippetCheckerCatchesErrors(t *testing.T) {
	bad := []snippet{
		{file: "docs/x.md", line: 10, code: "mw, err := idempotency.New(store, idempotency.WithScope(tenantOf))\n_ = mw\nreturn err\n"},
		{file: "docs/x.md", line: 20, code: "store := idempotency.NewRedisStore(rdb, idempotency.RedisOptions{})\n_ = store\n"},
		{file: "docs/x.md", line: 30, code: "package main\n\nfunc main() { undefinedName() }\n"},
	}
	good := snippet{file: "docs/x.md", line: 40, code: "mw, err := idempotency.New(store, idempotency.Options{Scope: tenantOf})\nif err != nil {\n\treturn err\n}\nmux.Handle(\"POST /venues\", mw.Handler(http.HandlerFunc(createVenue)))\n"}
	var units []unit
	for _, s := range append(bad, good) {
		u, err := build(s)
		if err != nil {
			t.Fatal(err)
		}
		units = append(units, u)
	}
	byPath := loadImports(t, units)
	for _, u := range units[:len(bad)] {
		errs := check(u, byPath)
		if len(errs) == 0 {
			t.Errorf("%s: a snippet that does not compile passed", u.snippet)
			continue
		}
		if want := fmt.Sprintf("docs/x.md:%d", u.line); !strings.Contains(errs[0], "docs/x.md:") {
			t.Errorf("%s: the error does not name the Markdown file (want about %s): %v", u.snippet, want, errs)
		}
	}
	if errs := check(units[len(bad)], byPath); len(errs) > 0 {
		t.Errorf("a snippet that compiles failed: %v", errs)
	}
}

// Package doctest holds a package's documentation to its code: every code
// block of the package doc must stand, line for line, in one of the
// package's test files, where the compiler builds it. A snippet that no
// longer compiles then fails the package's tests.
package doctest

import (
	"go/doc/comment"
	"go/parser"
	"go/token"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// Check fails t for each Go code block of the package doc of the package
// in dir that no _test.go file of dir holds (lines compared without their
// indentation; blank lines skipped), and when the doc shows no Go code.
func Check(t *testing.T, dir string) {
	t.Helper()
	files, err := filepath.Glob(filepath.Join(dir, "*.go"))
	if err != nil {
		t.Fatal(err)
	}
	var doc string
	var tests [][]string
	fset := token.NewFileSet()
	for _, name := range files {
		if strings.HasSuffix(name, "_test.go") {
			src, err := os.ReadFile(name)
			if err != nil {
				t.Fatal(err)
			}
			tests = append(tests, lines(string(src)))
			continue
		}
		f, err := parser.ParseFile(fset, name, nil, parser.PackageClauseOnly|parser.ParseComments)
		if err != nil {
			t.Fatal(err)
		}
		if f.Doc != nil {
			doc += f.Doc.Text()
		}
	}
	if doc == "" {
		t.Fatalf("%s: no package documentation", dir)
	}
	blocks := 0
	for _, block := range (&comment.Parser{}).Parse(doc).Content {
		code, ok := block.(*comment.Code)
		if !ok || !isGo(code.Text) {
			continue
		}
		blocks++
		if want := lines(code.Text); !anyHolds(tests, want) {
			t.Errorf("%s: no test file holds this snippet of the package documentation, so nothing compiles it:\n%s", dir, code.Text)
		}
	}
	if blocks == 0 {
		t.Errorf("%s: the package documentation shows no usage", dir)
	}
}

// isGo reports whether code parses as Go statements or declarations; a
// block that does not (a list of routes, say) is not code to compile.
func isGo(code string) bool {
	fset := token.NewFileSet()
	_, errStmts := parser.ParseFile(fset, "", "package p\nfunc _() {\n"+code+"\n}", 0)
	_, errDecls := parser.ParseFile(fset, "", "package p\n"+code, 0)
	return errStmts == nil || errDecls == nil
}

// lines returns the non-blank lines of s, trimmed.
func lines(s string) []string {
	var out []string
	for _, l := range strings.Split(s, "\n") {
		if l = strings.TrimSpace(l); l != "" {
			out = append(out, l)
		}
	}
	return out
}

// anyHolds reports whether one of files holds want as consecutive lines.
func anyHolds(files [][]string, want []string) bool {
	for _, f := range files {
		for i := 0; i+len(want) <= len(f); i++ {
			if slices.Equal(f[i:i+len(want)], want) {
				return true
			}
		}
	}
	return false
}

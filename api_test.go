package idempotency_test

import (
	"go/ast"
	"go/parser"
	"go/token"
	"path/filepath"
	"sort"
	"strings"
	"testing"
)

// TestExportedNames keeps the root package's API small: at most
// maxExported package-level exported types, functions, constants and
// variables, counted in the package's own (non-test) files; methods are
// listed too, and not counted.
func TestExportedNames(t *testing.T) {
	const maxExported = 60
	fset := token.NewFileSet()
	paths, err := filepath.Glob("*.go")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, path := range paths {
		if strings.HasSuffix(path, "_test.go") {
			continue
		}
		f, err := parser.ParseFile(fset, path, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, decl := range f.Decls {
			switch d := decl.(type) {
			case *ast.FuncDecl:
				if !d.Name.IsExported() {
					continue
				}
				if d.Recv != nil {
					recv := d.Recv.List[0].Type
					if star, ok := recv.(*ast.StarExpr); ok {
						recv = star.X
					}
					if id, ok := recv.(*ast.Ident); !ok || !id.IsExported() {
						continue
					}
					names = append(names, recv.(*ast.Ident).Name+"."+d.Name.Name)
					continue
				}
				names = append(names, d.Name.Name)
			case *ast.GenDecl:
				for _, spec := range d.Specs {
					switch s := spec.(type) {
					case *ast.TypeSpec:
						if s.Name.IsExported() {
							names = append(names, s.Name.Name)
						}
					case *ast.ValueSpec:
						for _, n := range s.Names {
							if n.IsExported() {
								names = append(names, n.Name)
							}
						}
					}
				}
			}
		}
	}
	sort.Strings(names)
	packageLevel := 0
	for _, name := range names {
		if !strings.Contains(name, ".") {
			packageLevel++
		}
	}
	t.Logf("%d exported names, %d of them package-level: %s", len(names), packageLevel, strings.Join(names, " "))
	if packageLevel > maxExported {
		t.Errorf("%d package-level exported names, at most %d", packageLevel, maxExported)
	}
}

package docs_test

import (
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
	"unicode"
)

// readmeLimit is the most bytes the README may hold: a front door (what
// the library is, how to start, one handler wrapped, which store, links),
// not the manual. Topics live in docs/.
const readmeLimit = 15_000

func TestREADMEIsAFrontDoor(t *testing.T) {
	fi, err := os.Stat("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	if fi.Size() > readmeLimit {
		t.Errorf("README.md is %d bytes, over %d: move the detail to a page in docs/", fi.Size(), readmeLimit)
	}
	t.Logf("README.md: %d bytes", fi.Size())
}

var link = regexp.MustCompile(`\]\(([^)#\s]+)(#[^)\s]*)?\)`)

// TestLinksResolve: every relative link in README.md and docs/*.md names
// a file or directory of the repository, and a #fragment into a Markdown
// file names one of its headings (as GitHub makes their anchors).
func TestLinksResolve(t *testing.T) {
	for path, name := range markdownFiles(t) {
		text, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		for _, m := range link.FindAllStringSubmatch(string(text), -1) {
			target, fragment := m[1], strings.TrimPrefix(m[2], "#")
			if strings.Contains(target, "://") || strings.HasPrefix(target, "mailto:") {
				continue
			}
			file := filepath.Join(filepath.Dir(path), target)
			linked, err := os.ReadFile(file)
			if err != nil {
				if _, err := os.Stat(file); err != nil {
					t.Errorf("%s links to %s, which does not exist", name, target)
				}
				continue
			}
			if fragment != "" && strings.HasSuffix(target, ".md") && !slices.Contains(anchors(linked), fragment) {
				t.Errorf("%s links to %s#%s, which has no such heading (it has %v)", name, target, fragment, anchors(linked))
			}
		}
	}
}

// anchors returns the anchors GitHub gives the headings of a Markdown
// file: lower case, punctuation dropped, spaces turned into hyphens.
func anchors(md []byte) []string {
	var out []string
	inCode := false
	for _, line := range strings.Split(string(md), "\n") {
		if strings.HasPrefix(strings.TrimSpace(line), "```") {
			inCode = !inCode
		}
		if inCode || !strings.HasPrefix(line, "#") {
			continue
		}
		heading := strings.TrimSpace(strings.TrimLeft(line, "#"))
		var b strings.Builder
		for _, r := range strings.ToLower(heading) {
			switch {
			case r == ' ':
				b.WriteByte('-')
			case r == '-' || r == '_' || unicode.IsLetter(r) || unicode.IsDigit(r):
				b.WriteRune(r)
			}
		}
		out = append(out, b.String())
	}
	return out
}

// citedTest matches a test's name, not a field such as
// stripefake.TestAPIKey.
var citedTest = regexp.MustCompile(`(?:^|[^.\w])((?:Test|Benchmark|Fuzz|Example)[A-Z][A-Za-z0-9_]*)`)

// TestCitedTestsExist: a claim in the docs names the test, benchmark or
// example that holds it; each name cited must be a function of some
// _test.go file of the repository, so that a renamed or deleted test
// cannot leave a claim unbacked.
func TestCitedTestsExist(t *testing.T) {
	defined := map[string]bool{}
	decl := regexp.MustCompile(`(?m)^func ((?:Test|Benchmark|Fuzz|Example)[A-Za-z0-9_]*)\(`)
	err := filepath.WalkDir("..", func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() && (d.Name() == ".git" || d.Name() == "testdata") {
			return filepath.SkipDir
		}
		if !d.IsDir() && strings.HasSuffix(path, "_test.go") {
			src, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			for _, m := range decl.FindAllStringSubmatch(string(src), -1) {
				defined[m[1]] = true
			}
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	// Tests that a page's own snippets define (a store's conformance
	// test, say) are examples, not citations.
	for _, s := range allSnippets(t) {
		for _, m := range decl.FindAllStringSubmatch(s.code, -1) {
			defined[m[1]] = true
		}
	}
	cited := 0
	for path, name := range markdownFiles(t) {
		text, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		var missing []string
		for _, m := range citedTest.FindAllStringSubmatch(string(text), -1) {
			cited++
			if !defined[m[1]] && !slices.Contains(missing, m[1]) {
				missing = append(missing, m[1])
			}
		}
		for _, m := range missing {
			t.Errorf("%s cites %s, which no _test.go file defines", name, m)
		}
	}
	t.Logf("%d citations of tests checked", cited)
}

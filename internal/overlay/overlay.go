// Package overlay merges option structs for tests: a helper's defaults,
// then a case's own.
package overlay

import "reflect"

// Merge returns the fields of opts laid over each other: a field that is
// not its zero value in a later struct wins.
func Merge[T any](opts ...T) T {
	var out T
	dst := reflect.ValueOf(&out).Elem()
	for _, o := range opts {
		src := reflect.ValueOf(o)
		for i := range src.NumField() {
			if f := src.Field(i); !f.IsZero() {
				dst.Field(i).Set(f)
			}
		}
	}
	return out
}

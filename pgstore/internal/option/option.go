// Package option fills in the defaults of pgstore's options structs and
// checks their ranges, one way for every constructor: a zero field takes
// its default, and a value out of range is an error that names the field.
package option

import (
	"cmp"
	"fmt"
)

// Default sets *v to def when it is the zero value.
func Default[T comparable](v *T, def T) {
	var zero T
	if *v == zero {
		*v = def
	}
}

// AtLeast refuses v below lo; what names it ("inbox: lease").
func AtLeast[T cmp.Ordered](what string, v, lo T) error {
	if v < lo {
		return fmt.Errorf("%s %v is less than %v", what, v, lo)
	}
	return nil
}

// Between refuses v outside lo to hi; what names it.
func Between[T cmp.Ordered](what string, v, lo, hi T) error {
	if v < lo || v > hi {
		return fmt.Errorf("%s %v is not between %v and %v", what, v, lo, hi)
	}
	return nil
}

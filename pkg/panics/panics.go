// Package panics turns a panic at a boundary where outside input enters tetherd (a configuration
// load or reload, an API request, a policy bundle, a kernel event, a SPIRE response) into an
// error that says what happened, and counts it by boundary for the metrics. A parser's bug then
// refuses one input instead of ending the process that holds the kill path, the policy, the
// credentials and the telemetry.
//
// The counts are process-wide (as expvar's are): every boundary is in tetherd, and telemetry reads
// them all.
package panics

import (
	"fmt"
	"maps"
	"runtime/debug"
	"sync"
)

var (
	mu     sync.Mutex
	counts = map[string]uint64{}
)

// Declare names a boundary, so that its count is reported (at 0) before any panic there.
func Declare(boundary string) string {
	mu.Lock()
	defer mu.Unlock()
	if _, ok := counts[boundary]; !ok {
		counts[boundary] = 0
	}
	return boundary
}

// Error is a recovered panic.
type Error struct {
	Boundary string
	Value    any
	Stack    []byte
}

func (e *Error) Error() string {
	return fmt.Sprintf("%s: internal error, refused (a panic: %v)", e.Boundary, e.Value)
}

// Catch, deferred, recovers a panic of the calling function, counts it under boundary and puts it
// into *err (joined with nothing: a panic replaces whatever the function was returning).
//
//	func load(b []byte) (c *Config, err error) {
//		defer panics.Catch("configuration", &err)
func Catch(boundary string, err *error) {
	v := recover()
	if v == nil {
		return
	}
	e := Record(boundary, v)
	if err != nil {
		*err = e
	}
}

// Record counts the panic v, recovered at boundary by the caller's own deferred function (recover
// works only there), and returns it as an *Error.
func Record(boundary string, v any) *Error {
	mu.Lock()
	counts[boundary]++
	mu.Unlock()
	return &Error{Boundary: boundary, Value: v, Stack: debug.Stack()}
}

// Run calls f and returns its error, or the panic it raised as an *Error counted under boundary.
func Run(boundary string, f func() error) (err error) {
	defer Catch(boundary, &err)
	return f()
}

// Counts returns the panics recovered so far, by boundary.
func Counts() map[string]uint64 {
	mu.Lock()
	defer mu.Unlock()
	return maps.Clone(counts)
}

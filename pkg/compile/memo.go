package compile

import (
	"context"
	"crypto/sha256"
	"sync"
)

// memoKey is the context key of a Memo.
type memoKey struct{}

// Memo lets the compiles under one context look at each path once: a policy change compiles
// every agent at one moment, and the same executables' identities were looked up for each of
// them (at 10,000 agents, most of the time a policy change took). What the compiles share is what
// the file system said at the first look, so a Memo is for one pass over the agents, never kept.
type Memo struct {
	mu       sync.Mutex
	stat     map[string]memoStat
	glob     map[string]memoGlob
	resolve  map[string]string
	writable map[string]bool
}

type memoStat struct {
	st  FileStat
	err error
}

type memoGlob struct {
	names []string
	err   error
}

// WithMemo returns ctx carrying a new Memo: Compile under it looks at each path once.
func WithMemo(ctx context.Context) context.Context {
	return context.WithValue(ctx, memoKey{}, &Memo{stat: map[string]memoStat{}, glob: map[string]memoGlob{},
		resolve: map[string]string{}, writable: map[string]bool{}})
}

// memoFiles is Files behind a Memo. Digest is not remembered: it reads the file's content, and
// an exec grant by digest must name what is there now.
type memoFiles struct {
	Files
	m *Memo
}

func memoized(ctx context.Context, f Files) Files {
	if m, ok := ctx.Value(memoKey{}).(*Memo); ok && f != nil {
		return memoFiles{Files: f, m: m}
	}
	return f
}

// remember returns cache[key], looking it up with look the first time (under no lock: two
// compiles may both look, and agree).
func remember[V any](m *Memo, cache map[string]V, key string, look func() V) V {
	m.mu.Lock()
	v, ok := cache[key]
	m.mu.Unlock()
	if !ok {
		v = look()
		m.mu.Lock()
		cache[key] = v
		m.mu.Unlock()
	}
	return v
}

func (f memoFiles) Stat(path string) (FileStat, error) {
	r := remember(f.m, f.m.stat, path, func() (r memoStat) {
		r.st, r.err = f.Files.Stat(path)
		return r
	})
	return r.st, r.err
}

func (f memoFiles) Glob(pattern string) ([]string, error) {
	r := remember(f.m, f.m.glob, pattern, func() (r memoGlob) {
		r.names, r.err = f.Files.Glob(pattern)
		return r
	})
	return append([]string(nil), r.names...), r.err
}

func (f memoFiles) Resolve(path string) string {
	return remember(f.m, f.m.resolve, path, func() string { return f.Files.Resolve(path) })
}

func (f memoFiles) WorldWritable(path string) bool {
	return remember(f.m, f.m.writable, path, func() bool { return f.Files.WorldWritable(path) })
}

func (f memoFiles) Digest(path string) (FileStat, [sha256.Size]byte, error) {
	return f.Files.Digest(path)
}

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

func (f memoFiles) Stat(path string) (FileStat, error) {
	f.m.mu.Lock()
	r, ok := f.m.stat[path]
	f.m.mu.Unlock()
	if !ok {
		r.st, r.err = f.Files.Stat(path)
		f.m.mu.Lock()
		f.m.stat[path] = r
		f.m.mu.Unlock()
	}
	return r.st, r.err
}

func (f memoFiles) Glob(pattern string) ([]string, error) {
	f.m.mu.Lock()
	r, ok := f.m.glob[pattern]
	f.m.mu.Unlock()
	if !ok {
		r.names, r.err = f.Files.Glob(pattern)
		f.m.mu.Lock()
		f.m.glob[pattern] = r
		f.m.mu.Unlock()
	}
	return append([]string(nil), r.names...), r.err
}

func (f memoFiles) Resolve(path string) string {
	f.m.mu.Lock()
	r, ok := f.m.resolve[path]
	f.m.mu.Unlock()
	if !ok {
		r = f.Files.Resolve(path)
		f.m.mu.Lock()
		f.m.resolve[path] = r
		f.m.mu.Unlock()
	}
	return r
}

func (f memoFiles) WorldWritable(path string) bool {
	f.m.mu.Lock()
	r, ok := f.m.writable[path]
	f.m.mu.Unlock()
	if !ok {
		r = f.Files.WorldWritable(path)
		f.m.mu.Lock()
		f.m.writable[path] = r
		f.m.mu.Unlock()
	}
	return r
}

func (f memoFiles) Digest(path string) (FileStat, [sha256.Size]byte, error) {
	return f.Files.Digest(path)
}

package compile

import (
	"context"
	"reflect"
	"sync/atomic"
	"testing"

	"github.com/tether-sh/tether/pkg/dataplane"
	"github.com/tether-sh/tether/pkg/grants"
)

// countingFiles counts the stats and globs that reach files.
type countingFiles struct {
	fakeFiles
	stats, globs *atomic.Int64
}

func (f countingFiles) Stat(path string) (FileStat, error) {
	f.stats.Add(1)
	return f.fakeFiles.Stat(path)
}

func (f countingFiles) Glob(pattern string) ([]string, error) {
	f.globs.Add(1)
	return f.fakeFiles.Glob(pattern)
}

// TestMemo checks that compiles under one WithMemo context look at each path once and compile
// what they compile without it, and that a context without one looks every time.
func TestMemo(t *testing.T) {
	g := grants.Grants{Exec: []grants.Exec{{Path: "/usr/bin/git"}, {Path: "/opt/x/*"}}}
	run := func(ctx context.Context, times int) (stats, globs int64, rs []dataplane.RuleSet) {
		f := countingFiles{fakeFiles: files, stats: new(atomic.Int64), globs: new(atomic.Int64)}
		for range times {
			res := Compile(ctx, g, Options{Files: f})
			if len(res.Refused) != 0 {
				t.Fatalf("refused: %v", res.Refused)
			}
			rs = append(rs, res.RuleSet)
		}
		return f.stats.Load(), f.globs.Load(), rs
	}
	once, onceGlobs, _ := run(context.Background(), 1)
	plain, plainGlobs, plainRS := run(context.Background(), 3)
	memo, memoGlobs, memoRS := run(WithMemo(context.Background()), 3)
	if once == 0 || onceGlobs == 0 {
		t.Fatalf("one compile: %d stats, %d globs: the grants look at no file", once, onceGlobs)
	}
	if plain != 3*once || plainGlobs != 3*onceGlobs {
		t.Errorf("without a memo: %d stats and %d globs for 3 compiles, want %d and %d", plain, plainGlobs, 3*once, 3*onceGlobs)
	}
	if memo > once || memoGlobs != onceGlobs {
		t.Errorf("under one memo: %d stats and %d globs for 3 compiles, want at most %d and %d", memo, memoGlobs, once, onceGlobs)
	}
	if !reflect.DeepEqual(plainRS, memoRS) {
		t.Errorf("a memo changed what was compiled:\n%+v\n%+v", plainRS, memoRS)
	}
}

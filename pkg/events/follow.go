package events

import (
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"syscall"
	"time"
)

// Follow copies the decision log at path to w as it grows, until ctx ends: what is there when it
// starts too when fromStart, else only what comes after. It follows the log's rotation (File
// renames path.k to path.k+1 and path to path.1, and starts a new path): it reads a file to its
// end, then the file written after it (found by the inode among the rotated files) from its
// start, so no record is lost or repeated unless more files rotate between two looks than the
// log keeps. A log that does not exist yet is waited for. It looks every poll.
func Follow(ctx context.Context, path string, fromStart bool, w io.Writer, poll time.Duration) error {
	var f *os.File
	var ino uint64
	defer func() {
		if f != nil {
			f.Close()
		}
	}()
	buf := make([]byte, 64<<10)
	drain := func() error {
		for {
			n, err := f.Read(buf)
			if n > 0 {
				if _, werr := w.Write(buf[:n]); werr != nil {
					return werr
				}
			}
			if errors.Is(err, io.EOF) || (err == nil && n == 0) {
				return nil
			}
			if err != nil {
				return err
			}
		}
	}
	first := true
	for {
		if f == nil {
			nf, err := os.Open(path)
			switch {
			case err == nil:
				if first && !fromStart {
					if _, err := nf.Seek(0, io.SeekEnd); err != nil {
						nf.Close()
						return err
					}
				}
				f, ino = nf, inodeOf(nf)
			case !errors.Is(err, fs.ErrNotExist):
				return err
			}
			first = false
		}
		if f != nil {
			if err := drain(); err != nil {
				return err
			}
			if st, err := os.Stat(path); err != nil || st.Sys().(*syscall.Stat_t).Ino != ino {
				// Rotated (or removed): what was written to the file before the rename is in
				// it; read it to its end, then take the one written after it from its start.
				if err := drain(); err != nil {
					return err
				}
				next, err := openSuccessor(path, ino)
				if err != nil {
					return err
				}
				f.Close()
				f = next
				if f != nil {
					ino = inodeOf(f)
					continue
				}
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(poll):
		}
	}
}

// openSuccessor opens the file of the log at path written after the one with inode ino: path.k-1
// when that one is path.k now (path after path.1), or nil when there is none yet. A file no longer
// among the rotated ones (gone) is followed by path. It checks that the files did not move
// while it opened the successor, and looks again if they did.
func openSuccessor(path string, ino uint64) (*os.File, error) {
	for range 100 {
		name, slot := path, ""
		for k := 1; ; k++ {
			rotated := fmt.Sprintf("%s.%d", path, k)
			st, err := os.Stat(rotated)
			if err != nil {
				break
			}
			if st.Sys().(*syscall.Stat_t).Ino == ino {
				slot = rotated
				if k > 1 {
					name = fmt.Sprintf("%s.%d", path, k-1)
				}
				break
			}
		}
		f, err := os.Open(name)
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		if slot == "" {
			return f, nil
		}
		if st, err := os.Stat(slot); err == nil && st.Sys().(*syscall.Stat_t).Ino == ino {
			return f, nil // the file followed is where it was: name was its successor
		}
		f.Close() // rotated again meanwhile
	}
	return os.Open(path)
}

func inodeOf(f *os.File) uint64 {
	st, err := f.Stat()
	if err != nil {
		return 0
	}
	return st.Sys().(*syscall.Stat_t).Ino
}

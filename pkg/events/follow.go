package events

import (
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"syscall"
	"time"
)

// Follow copies the decision log at path to w as it grows, until ctx ends: what is there when it
// starts too when fromStart, else only what comes after. It follows the log's rotation (File
// renames path to path.1 and starts a new path): it reads the old file to its end, then the new
// one from its start, so no record is lost or repeated while it keeps up. A log that does not
// exist yet is waited for. It looks every poll.
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
				// Rotated (or removed): what was written to the old file before the rename is
				// in it; read it to its end, then take the new one from its start.
				if err := drain(); err != nil {
					return err
				}
				f.Close()
				f = nil
				continue
			}
		}
		select {
		case <-ctx.Done():
			return nil
		case <-time.After(poll):
		}
	}
}

func inodeOf(f *os.File) uint64 {
	st, err := f.Stat()
	if err != nil {
		return 0
	}
	return st.Sys().(*syscall.Stat_t).Ino
}

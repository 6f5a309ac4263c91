package events

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"sync"
)

// File is a decision log file: JSON lines appended to path, rotated by size. When a record
// would take the file past MaxBytes, path becomes path.1 (path.1 becomes path.2, and so on, up
// to Keep old files; the oldest is removed) and a new path is started. Records are gathered in a
// buffer that is written when it is full and whenever the pump has nothing more to write
// (Flush), so a busy log costs one write per fileBuffer bytes and a quiet one shows each record
// at once; a record is never split between two writes.
//
// The rotation is not lumberjack's (the well-kept rotator): it would make three things worse.
// Its limit is whole megabytes, where max_bytes is bytes; it hides the file, so a short write on
// a full disk could not be cut back to whole lines (flush) and the records lost counted exactly;
// and its backups are named by time, where tetherctl's and tetherd's tail-log (Follow) and
// logrotate-style consumers read the numbered path.1, path.2.
type File struct {
	path     string
	maxBytes int64
	keep     int

	mu   sync.Mutex
	f    *os.File
	size int64  // of the file, buffered bytes included
	buf  []byte // records not yet written
	held int    // how many
	// torn: a short write left part of a record at the end of the file.
	torn bool
	line lineEncoder
}

// FlushError is a failed write of buffered records: Records of them are lost.
type FlushError struct {
	Records int
	Err     error
}

func (e *FlushError) Error() string {
	return fmt.Sprintf("writing decision log: %d records lost: %v", e.Records, e.Err)
}

func (e *FlushError) Unwrap() error { return e.Err }

// fileBuffer is how many bytes of records File gathers before it writes them.
const fileBuffer = 256 << 10

// OpenFile opens (appending) the decision log at path. maxBytes 0 never rotates.
func OpenFile(path string, maxBytes int64, keep int) (*File, error) {
	l := &File{path: path, maxBytes: maxBytes, keep: max(keep, 1)}
	if err := l.open(); err != nil {
		return nil, err
	}
	return l, nil
}

func (l *File) open() error {
	f, err := os.OpenFile(l.path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o640)
	if err != nil {
		return fmt.Errorf("opening decision log: %w", err)
	}
	st, err := f.Stat()
	if err != nil {
		f.Close()
		return fmt.Errorf("opening decision log: %w", err)
	}
	l.f, l.size = f, st.Size()
	return nil
}

// rotate moves the files along and starts a new one. Call with l.mu held.
func (l *File) rotate() error {
	if err := l.flush(); err != nil {
		return err
	}
	l.f.Close()
	os.Remove(fmt.Sprintf("%s.%d", l.path, l.keep))
	for i := l.keep - 1; i >= 1; i-- {
		os.Rename(fmt.Sprintf("%s.%d", l.path, i), fmt.Sprintf("%s.%d", l.path, i+1))
	}
	if err := os.Rename(l.path, l.path+".1"); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("rotating decision log: %w", err)
	}
	return l.open()
}

// Write appends d as one line.
func (l *File) Write(d Decision) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	b, err := l.line.encode(d)
	if err != nil {
		return err
	}
	// A failed flush of what was buffered loses those records (counted by the FlushError), not
	// this one: it is buffered all the same, for the next write.
	var ferr *FlushError
	if l.maxBytes > 0 && l.size > 0 && l.size+int64(len(b)) > l.maxBytes {
		if err := l.rotate(); err != nil && !errors.As(err, &ferr) {
			return err
		}
	}
	if len(l.buf)+len(b) > fileBuffer {
		if err := l.flush(); err != nil && !errors.As(err, &ferr) {
			return err
		}
	}
	l.buf = append(l.buf, b...)
	l.held++
	l.size += int64(len(b))
	if ferr != nil {
		return ferr
	}
	return nil
}

// Flush writes the buffered records.
func (l *File) Flush() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.flush()
}

// flush writes the buffer, cut at record boundaries only. Call with l.mu held.
//
// A short write (the disk is full) keeps the records it wrote whole and takes back the part of
// the one it stopped in, so the log stays whole lines and a record is either in it or counted
// lost. Should the file not shrink, the next write starts on a new line: the fragment stays a line
// of its own, and the next record whole.
func (l *File) flush() error {
	if len(l.buf) == 0 {
		return nil
	}
	if l.torn {
		l.buf = append([]byte{'\n'}, l.buf...)
	}
	n, err := l.f.Write(l.buf)
	held, wrote := l.held, l.buf[:n]
	written := bytes.Count(wrote, []byte{'\n'})
	if l.torn && n > 0 {
		written-- // the line break that ended the fragment
		l.torn = false
	}
	frag := n - (bytes.LastIndexByte(wrote, '\n') + 1)
	l.buf, l.held = l.buf[:0], 0
	if err == nil {
		return nil
	}
	if frag > 0 {
		l.torn = true
		if st, serr := l.f.Stat(); serr == nil && l.f.Truncate(st.Size()-int64(frag)) == nil {
			l.torn = false
		}
	}
	if st, serr := l.f.Stat(); serr == nil {
		l.size = st.Size()
	}
	return &FlushError{Records: held - written, Err: err}
}

// Close writes what is buffered and closes the file.
func (l *File) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return errors.Join(l.flush(), l.f.Close())
}

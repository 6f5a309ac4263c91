package events

import (
	"encoding/json"
	"fmt"
	"os"
	"sync"
)

// File is a decision log file: JSON lines appended to path, rotated by size. When a record
// would take the file past MaxBytes, path becomes path.1 (path.1 becomes path.2, and so on, up
// to Keep old files; the oldest is removed) and a new path is started. Every record is written
// whole with one write.
type File struct {
	path     string
	maxBytes int64
	keep     int

	mu   sync.Mutex
	f    *os.File
	size int64
}

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
	b, err := json.Marshal(d)
	if err != nil {
		return err
	}
	b = append(b, '\n')
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.maxBytes > 0 && l.size > 0 && l.size+int64(len(b)) > l.maxBytes {
		if err := l.rotate(); err != nil {
			return err
		}
	}
	n, err := l.f.Write(b)
	l.size += int64(n)
	return err
}

// Close closes the file.
func (l *File) Close() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.f.Close()
}

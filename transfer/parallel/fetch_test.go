package parallel

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"sync"
	"testing"
)

func TestSplit(t *testing.T) {
	got := Split([]Range{{0, 10}, {20, 4}, {30, 0}, {40, 8}}, 4)
	want := []Range{{0, 4}, {4, 4}, {8, 2}, {20, 4}, {40, 4}, {44, 4}}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("Split = %v, want %v", got, want)
	}
}

// Fetch hands every piece to the sink with its bytes; kept buffers are not
// reused; a short read and a sink error stop it with that error.
func TestFetch(t *testing.T) {
	s := newSrc(1<<20, 3)
	pieces := Split([]Range{{100, 300000}, {500000, 200000}}, 64<<10)
	bufs := NewBuffers(pieces)
	var mu sync.Mutex
	kept := map[int]*[]byte{}
	seen := make([]bool, len(pieces))
	err := Fetch(context.Background(), s, pieces, 3, bufs, func(i int, bp *[]byte) (bool, error) {
		p := pieces[i]
		if !bytes.Equal((*bp)[:p.Length], s.data[p.Offset:p.Offset+p.Length]) {
			return false, fmt.Errorf("piece %d: wrong bytes", i)
		}
		mu.Lock()
		defer mu.Unlock()
		seen[i] = true
		if i%2 == 0 {
			kept[i] = bp
			return true, nil
		}
		return false, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	for i, ok := range seen {
		if !ok {
			t.Fatalf("piece %d never reached the sink", i)
		}
	}
	for i, bp := range kept {
		p := pieces[i]
		if !bytes.Equal((*bp)[:p.Length], s.data[p.Offset:p.Offset+p.Length]) {
			t.Fatalf("kept piece %d was overwritten", i)
		}
	}

	short := Split([]Range{{1<<20 - 100, 200}}, 64<<10)
	if err := Fetch(context.Background(), s, short, 2, NewBuffers(short), func(int, *[]byte) (bool, error) { return false, nil }); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Fatalf("read past the end: %v, want io.ErrUnexpectedEOF", err)
	}
	if err := Fetch(context.Background(), s, pieces, 2, bufs, func(int, *[]byte) (bool, error) { return false, errBoom }); !errors.Is(err, errBoom) {
		t.Fatalf("sink error: %v, want errBoom", err)
	}
}

// Command mkvol writes a raw volume shaped like a used VM disk, for
// bench/hostpath.sh: per 4 MiB, 2 MiB of random bytes, 1 MiB of log text
// and 1 MiB of zeros (left as a hole). Deterministic for a seed. With
// -change it rewrites, in place, 1 MiB pieces spread evenly over an
// existing volume with fresh random bytes (the "1 % changed" backup).
package main

import (
	"bufio"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"strconv"
)

const (
	mib   = 1 << 20
	group = 4 * mib
)

func main() {
	out := flag.String("o", "", "output raw file")
	sizeMB := flag.Int64("size", 2048, "volume size in MiB (a multiple of 4)")
	seed := flag.Uint64("seed", 1, "seed of the random and text content")
	change := flag.Int64("change", 0, "rewrite this many MiB of an existing volume instead")
	flag.Parse()
	if *out == "" || *sizeMB <= 0 || *sizeMB%4 != 0 {
		fmt.Fprintln(os.Stderr, "usage: mkvol -o FILE [-size MiB (multiple of 4)] [-seed N] [-change MiB]")
		os.Exit(2)
	}
	var err error
	if *change > 0 {
		err = rewrite(*out, *sizeMB, *change, *seed)
	} else {
		err = create(*out, *sizeMB, *seed)
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "mkvol:", err)
		os.Exit(1)
	}
}

func fillRandom(rng *rand.Rand, b []byte) {
	for i := 0; i+8 <= len(b); i += 8 {
		v := rng.Uint64()
		for k := range 8 {
			b[i+k] = byte(v >> (8 * k))
		}
	}
}

// fillText writes log lines into b (exactly len(b) bytes).
func fillText(rng *rand.Rand, b []byte, t *int64) {
	levels := []string{"INFO", "INFO", "INFO", "DEBUG", "WARN", "ERROR"}
	services := []string{"nova-compute", "libvirtd", "sshd", "kernel", "systemd", "zstack-agent", "nginx", "mysqld"}
	verbs := []string{"GET", "POST", "PUT", "DELETE"}
	paths := []string{"/api/v1/vms", "/api/v1/volumes", "/health", "/metrics", "/api/v1/images", "/login"}
	msgs := []string{
		"connection from %d.%d.%d.%d port %d accepted",
		"volume %08x attached to instance %08x",
		"request completed in %d ms status=%d",
		"checkpoint complete: wrote %d buffers (%d%%)",
		"Started Session %d of user %s.",
		"disk I/O latency %d us on vd%c",
	}
	users := []string{"root", "admin", "zstack", "backup", "www-data"}
	pos := 0
	for pos < len(b) {
		*t += int64(rng.IntN(2000))
		s := *t / 1000
		line := fmt.Sprintf("2026-12-%02d %02d:%02d:%02d.%03d host-%02d %s[%d]: %s ", 1+s/86400%28, s/3600%24, s/60%60, s%60, *t%1000,
			rng.IntN(16), services[rng.IntN(len(services))], 1000+rng.IntN(30000), levels[rng.IntN(len(levels))])
		switch k := rng.IntN(len(msgs) + 1); k {
		case 0:
			line += fmt.Sprintf(msgs[0], 10, rng.IntN(256), rng.IntN(256), rng.IntN(256), 1024+rng.IntN(60000))
		case 1:
			line += fmt.Sprintf(msgs[1], rng.Uint32(), rng.Uint32())
		case 2:
			line += fmt.Sprintf(msgs[2], rng.IntN(900), []int{200, 200, 200, 201, 404, 500}[rng.IntN(6)])
		case 3:
			line += fmt.Sprintf(msgs[3], rng.IntN(5000), rng.IntN(100))
		case 4:
			line += fmt.Sprintf(msgs[4], rng.IntN(100000), users[rng.IntN(len(users))])
		case 5:
			line += fmt.Sprintf(msgs[5], rng.IntN(20000), 'a'+rune(rng.IntN(4)))
		default:
			line += verbs[rng.IntN(len(verbs))] + " " + paths[rng.IntN(len(paths))] + "?id=" + strconv.Itoa(rng.IntN(1e6)) + " HTTP/1.1"
		}
		line += "\n"
		pos += copy(b[pos:], line)
	}
}

func create(path string, sizeMB int64, seed uint64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	rng := rand.New(rand.NewPCG(seed, 0x5eed))
	w := bufio.NewWriterSize(f, 4*mib)
	buf := make([]byte, 3*mib)
	var t int64
	for off := int64(0); off < sizeMB*mib; off += group {
		fillRandom(rng, buf[:2*mib])
		fillText(rng, buf[2*mib:], &t)
		if _, err := w.Write(buf); err != nil {
			return err
		}
		if err := w.Flush(); err != nil {
			return err
		}
		if _, err := f.Seek(mib, 1); err != nil { // the zero MiB: a hole
			return err
		}
	}
	if err := f.Truncate(sizeMB * mib); err != nil {
		return err
	}
	return f.Close()
}

func rewrite(path string, sizeMB, changeMB int64, seed uint64) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	rng := rand.New(rand.NewPCG(seed, 0xc4a9e))
	buf := make([]byte, mib)
	step := sizeMB / changeMB * mib
	for i := int64(0); i < changeMB; i++ {
		fillRandom(rng, buf)
		if _, err := f.WriteAt(buf, i*step); err != nil {
			return err
		}
	}
	return f.Close()
}

package main

import "context"

// cmdStopbak stops running live backups of a domain. Hosts call it before
// every live migration; with nothing running it succeeds (exit 0).
func cmdStopbak(_ context.Context, g *globals, args []string) error {
	fs := g.subFlags("stopbak")
	domain := fs.String("domain", "", "the VM (libvirt domain name)")
	fs.Bool("force", false, "stop at once")
	fs.Bool("batbak", false, "stop the VM's batbak job")
	fs.String("drive", "", "stop only this drive's backup")
	pos, err := parseArgs(fs, args)
	if err != nil {
		return err
	}
	if len(pos) != 0 || *domain == "" {
		return usageErr("stopbak [-force=B] -domain VM [-batbak] [-drive NODE]")
	}
	return nil // no backup engine runs in this process yet: nothing to stop
}

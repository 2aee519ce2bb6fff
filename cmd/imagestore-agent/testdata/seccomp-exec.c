/*
 * seccomp-exec: run a program under a systemd-style seccomp sandbox, the
 * way systemd applies SystemCallFilter= and RestrictAddressFamilies= to a
 * service (both through libseccomp, as systemd does):
 *
 *   seccomp-exec SYSCALLS-FILE FAMILIES -- PROGRAM [ARGS...]
 *
 * SYSCALLS-FILE lists the allowed system calls, one name per line (the
 * unit's SystemCallFilter= sets already expanded and subtracted); any
 * other system call kills the process (SCMP_ACT_KILL_PROCESS, systemd's
 * default action). FAMILIES is a comma-separated list of address family
 * numbers; socket(2) with any other family fails with EAFNOSUPPORT.
 * Children inherit the filter across fork and exec, as a service's do.
 * Names this libseccomp does not know are skipped, as systemd does.
 * Used by the unit's sandbox test only.
 */
#include <errno.h>
#include <seccomp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define MAX_FAMILY 64

int main(int argc, char **argv) {
	if (argc < 5 || strcmp(argv[3], "--") != 0) {
		fprintf(stderr, "usage: seccomp-exec SYSCALLS-FILE FAMILIES -- PROGRAM [ARGS...]\n");
		return 2;
	}
	scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_KILL_PROCESS);
	if (!ctx) {
		fprintf(stderr, "seccomp_init failed\n");
		return 2;
	}
	int socket_nr = seccomp_syscall_resolve_name("socket");
	int socket_allowed = 0;
	FILE *f = fopen(argv[1], "r");
	if (!f) {
		perror(argv[1]);
		return 2;
	}
	char line[256];
	while (fgets(line, sizeof line, f)) {
		line[strcspn(line, "\r\n")] = 0;
		if (!line[0])
			continue;
		int nr = seccomp_syscall_resolve_name(line);
		if (nr == __NR_SCMP_ERROR)
			continue;
		if (nr == socket_nr) {
			socket_allowed = 1;
			continue; /* conditional rules below */
		}
		int r = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0);
		if (r < 0 && r != -EEXIST) {
			fprintf(stderr, "allow %s: %s\n", line, strerror(-r));
			return 2;
		}
	}
	fclose(f);
	if (socket_allowed) {
		int allowed[MAX_FAMILY] = {0};
		char *fams = strdup(argv[2]);
		for (char *tok = strtok(fams, ","); tok; tok = strtok(NULL, ",")) {
			int fam = atoi(tok);
			if (fam >= 0 && fam < MAX_FAMILY)
				allowed[fam] = 1;
		}
		for (int fam = 0; fam < MAX_FAMILY; fam++) {
			uint32_t action = allowed[fam] ? SCMP_ACT_ALLOW : SCMP_ACT_ERRNO(EAFNOSUPPORT);
			if (seccomp_rule_add(ctx, action, socket_nr, 1, SCMP_A0(SCMP_CMP_EQ, fam)) < 0) {
				fprintf(stderr, "socket rule %d failed\n", fam);
				return 2;
			}
		}
		if (seccomp_rule_add(ctx, SCMP_ACT_ERRNO(EAFNOSUPPORT), socket_nr, 1, SCMP_A0(SCMP_CMP_GE, MAX_FAMILY)) < 0) {
			fprintf(stderr, "socket rule >= %d failed\n", MAX_FAMILY);
			return 2;
		}
	}
	if (seccomp_attr_set(ctx, SCMP_FLTATR_CTL_NNP, 1) < 0 || seccomp_load(ctx) < 0) {
		fprintf(stderr, "seccomp_load failed\n");
		return 2;
	}
	execvp(argv[4], argv + 4);
	perror(argv[4]);
	return 127;
}

/* oracle.c: the scenario language (lang.py) run on a real kernel, as /init of an initramfs.
 *
 * Static, no libc extras: raw syscalls for move_pages, migrate_pages, mbind, io_uring.
 * pid 1 (the controller) reads /scenarios.txt and, per scenario, forks slot 0; every
 * scenario process is a server that reads commands from its own pipe (slots 0..7, all
 * pipes made before slot 0 is forked, so forked children inherit theirs) and answers on
 * another. Results go to /dev/ttyS1 (the second serial port) in model.py's format.
 * Built with: gcc -static -O1 -o init oracle.c
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/reboot.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/wait.h>
#include <unistd.h>

#define PS 4096UL
#define THP (2UL << 20)
#define MAXP 8
#define MAXR 32
#define MAXA 4096
#define UNSET INT_MIN
#define BAD_ADDR 4096UL
#ifndef MAP_FIXED_NOREPLACE
#define MAP_FIXED_NOREPLACE 0x100000
#endif
/* copyengine's MMAP_BASE (mm/process.py): where the first region's pad goes */
static unsigned long next_addr = 1UL << 40;
#define NO_PID 99999

struct region { char name[16]; unsigned long addr; long npages; unsigned char *mapped; };
static struct region regs[MAXR];
static int nregs, slot;
static int cmdp[MAXP][2], resp[MAXP][2];
static FILE *out;

static void die(const char *m) { dprintf(2, "oracle: %s: %s\n", m, strerror(errno)); reboot(RB_POWER_OFF); _exit(1); }

static void wr(const char *path, const char *v)
{
	int fd = open(path, O_WRONLY);
	if (fd < 0 || write(fd, v, strlen(v)) < 0)
		dprintf(2, "oracle: cannot set %s: %s\n", path, strerror(errno));
	if (fd >= 0) close(fd);
}

/* key=value lookup in a command line */
static const char *arg(const char *line, const char *key)
{
	static char buf[65536];
	size_t k = strlen(key);
	const char *p = line;
	while ((p = strstr(p, key))) {
		if ((p == line || p[-1] == ' ') && p[k] == '=') {
			const char *e = strchr(p + k + 1, ' ');
			size_t n = e ? (size_t)(e - p - k - 1) : strlen(p + k + 1);
			memcpy(buf, p + k + 1, n); buf[n] = 0;
			return buf;
		}
		p += k;
	}
	return NULL;
}
static long iarg(const char *line, const char *key, long def)
{
	const char *v = arg(line, key);
	return v ? strtol(v, NULL, 10) : def;
}

static struct region *region(const char *name)
{
	for (int i = 0; i < nregs; i++)
		if (!strcmp(regs[i].name, name)) return &regs[i];
	return NULL;
}

static void vmstat(long *pg, long *thp)
{
	char buf[16384]; int fd = open("/proc/vmstat", O_RDONLY); ssize_t n = read(fd, buf, sizeof buf - 1);
	close(fd); buf[n > 0 ? n : 0] = 0;
	char *p = strstr(buf, "\npgmigrate_success "); *pg = p ? atol(p + 19) : -1;
	p = strstr(buf, "\nthp_migration_success "); *thp = p ? atol(p + 23) : -1;
}

/* run-length "v*count" list, "x" for UNSET */
static void rle(char *dst, const int *v, long n)
{
	char *o = dst; *o = 0;
	if (!n) { strcpy(dst, "-"); return; }
	for (long i = 0; i < n;) {
		long j = i;
		while (j < n && v[j] == v[i]) j++;
		if (o != dst) *o++ = ',';
		if (v[i] == UNSET) o += sprintf(o, "x"); else o += sprintf(o, "%d", v[i]);
		if (j - i > 1) o += sprintf(o, "*%ld", j - i);
		i = j;
	}
}

static int reply(const char *fmt, ...)
{
	static char buf[1 << 18]; va_list ap; va_start(ap, fmt);
	int n = vsnprintf(buf, sizeof buf - 2, fmt, ap); va_end(ap);
	buf[n++] = '\n';
	return write(resp[slot][1], buf, n) == n ? 0 : -1;
}

static long query(int pid, void **pages, int *st, long n)
{
	for (long i = 0; i < n; i++) st[i] = UNSET;
	return syscall(SYS_move_pages, pid, n, pages, NULL, st, 0);
}

static int addrs_of(const char *list, void **pages, int *bad)
{
	char tmp[65536]; int n = 0; strncpy(tmp, list, sizeof tmp - 1); tmp[sizeof tmp - 1] = 0;
	for (char *t = strtok(tmp, ","); t && n < MAXA; t = strtok(NULL, ",")) {
		if (!strcmp(t, "bad")) { pages[n++] = (void *)BAD_ADDR; continue; }
		char *c = strchr(t, ':'); *c = 0;
		struct region *r = region(t);
		if (!r) { *bad = 1; return 0; }
		long pg = strtol(c + 1, &c, 10), off = *c == '+' ? strtol(c + 1, NULL, 10) : 0;
		pages[n++] = (void *)(r->addr + pg * PS + off);
	}
	return n;
}

static int nodelist(const char *list, unsigned long *mask)
{
	char tmp[4096]; strncpy(tmp, list, sizeof tmp - 1); tmp[sizeof tmp - 1] = 0;
	*mask = 0;
	for (char *t = strtok(tmp, ","); t; t = strtok(NULL, ",")) *mask |= 1UL << atoi(t);
	return 0;
}

static void *pages[MAXA], *pages2[MAXA * 4];
static int st[MAXA * 4], st2[MAXA * 4];
static char line[1 << 16], rl[1 << 18];

static long own_pages(void)
{
	long n = 0;
	for (int i = 0; i < nregs; i++)
		for (long j = 0; j < regs[i].npages && n < MAXA * 4; j++) pages2[n++] = (void *)(regs[i].addr + j * PS);
	return n;
}

static void serve(void);

static void do_op(char *l)
{
	char op[16]; long ln = iarg(l, "L", 0);
	sscanf(l, "%15s", op);
	int target = 0; const char *t = arg(l, "T");
	if (t) target = atoi(t);
	if (!strcmp(op, "mmap")) {
		long n = iarg(l, "pages", 1), thp = iarg(l, "thp", 0), sh = iarg(l, "shared", 0);
		unsigned long len = n * PS;
		/* Placed bottom-up by copyengine's own rule (model.py: a 2 MiB pad that is
		 * unmapped again, the region, a guard page left unmapped), from its MMAP_BASE:
		 * 2 MiB-aligned, so that page-table-aligned windows (fault-around, PMDs) fall
		 * alike, and at the same place relative to every region of every process, so
		 * that an address of one process's region means the same thing in another
		 * (fork inherits next_addr). The pad is mapped and unmapped here too: a shared
		 * mapping's file offset at the region is then 2 MiB, PMD-aligned like its
		 * address (shmem THPs need both). Holes, not PROT_NONE pages: no VMA merge. */
		unsigned long a = ((next_addr + THP - 1) & ~(THP - 1)) + THP;
		char *m = mmap((void *)(a - THP), len + THP, PROT_READ | PROT_WRITE,
			       (sh ? MAP_SHARED : MAP_PRIVATE) | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0);
		if (m == MAP_FAILED) { reply("op %ld errno=%d", ln, errno); return; }
		munmap(m, THP);
		next_addr = a + len + PS;
		madvise((void *)a, len, thp ? MADV_HUGEPAGE : MADV_NOHUGEPAGE);
		unsigned long mask = 1UL << iarg(l, "node", 0);
		if (syscall(SYS_mbind, a, len, 2 /* MPOL_BIND */, &mask, 65, 0)) { reply("op %ld errno=%d", ln, errno); return; }
		if (iarg(l, "populate", 0) && madvise((void *)a, len, 23 /* MADV_POPULATE_WRITE */)) {
			reply("op %ld errno=%d", ln, errno); return;
		}
		struct region *r = &regs[nregs++];
		strncpy(r->name, arg(l, "r"), sizeof r->name - 1);
		r->addr = a; r->npages = n; r->mapped = malloc(n); memset(r->mapped, 1, n);
		reply("ok");
	} else if (!strcmp(op, "write") || !strcmp(op, "read") || !strcmp(op, "munmap") || !strcmp(op, "pin")) {
		struct region *r = region(arg(l, "r"));
		long i = iarg(l, "page", 0), n = iarg(l, "n", 1);
		if (!r || i + n > r->npages) { reply("error line %ld", ln); return; }
		if (op[0] != 'm') for (long k = i; k < i + n; k++) if (!r->mapped[k]) { reply("error line %ld", ln); return; }
		volatile char *a = (volatile char *)(r->addr + i * PS);
		if (op[0] == 'w') for (long k = 0; k < n; k++) a[k * PS] = (char)(ln % 251 + 1);
		else if (op[0] == 'r') for (long k = 0; k < n; k++) (void)a[k * PS];
		else if (op[0] == 'm') {
			if (munmap((void *)a, n * PS)) { reply("op %ld errno=%d", ln, errno); return; }
			memset(r->mapped + i, 0, n);
		} else {
			/* a long-term pin: io_uring fixed buffers (FOLL_WRITE|FOLL_LONGTERM) */
			unsigned char params[120]; memset(params, 0, sizeof params);
			int fd = syscall(SYS_io_uring_setup, 1, params);
			struct iovec iov = { (void *)a, n * PS };
			if (fd < 0 || syscall(SYS_io_uring_register, fd, 0 /* REGISTER_BUFFERS */, &iov, 1)) {
				reply("op %ld errno=%d", ln, errno); return;
			}
		}
		reply("ok");
	} else if (!strcmp(op, "fork")) {
		int c = iarg(l, "child", 0);
		pid_t pid = fork();
		if (pid < 0) { reply("op %ld errno=%d", ln, errno); return; }
		if (!pid) { slot = c; reply("pid %d", getpid()); serve(); _exit(0); }
		reply("ok");
	} else if (!strcmp(op, "exit")) {
		reply("ok"); _exit(0);
	} else if (!strcmp(op, "move") || !strcmp(op, "query")) {
		int bad = 0, n = addrs_of(arg(l, "addrs"), pages, &bad);
		if (bad) { reply("error line %ld", ln); return; }
		int nodes[MAXA]; long pg0, th0, pg1, th1; int flags = 0;
		if (op[0] == 'm') {
			char tmp[65536]; strncpy(tmp, arg(l, "nodes"), sizeof tmp - 1); int k = 0;
			for (char *x = strtok(tmp, ","); x && k < n; x = strtok(NULL, ",")) nodes[k++] = atoi(x);
			const char *f = arg(l, "flags");
			flags = !strcmp(f, "move") ? 2 : !strcmp(f, "all") ? 4 : !strcmp(f, "bad") ? 8 : 0;
		}
		for (int i = 0; i < n; i++) st[i] = UNSET;
		vmstat(&pg0, &th0);
		long ret = syscall(SYS_move_pages, target, n, pages, op[0] == 'm' ? nodes : NULL, st, flags);
		int e = ret < 0 ? errno : 0;
		vmstat(&pg1, &th1);
		rle(rl, st, n);
		reply("call %ld ret=%ld errno=%d status=%s pgmig=%ld thpmig=%ld", ln, ret, e, rl, pg1 - pg0, th1 - th0);
	} else if (!strcmp(op, "migrate")) {
		unsigned long old, new; nodelist(arg(l, "old"), &old); nodelist(arg(l, "new"), &new);
		long n = own_pages(), moved = 0, k1 = 0;
		long r0 = n ? query(target, pages2, st2, n) : -1;
		long ret = syscall(SYS_migrate_pages, target, 65, &old, &new);
		int e = ret < 0 ? errno : 0;
		if (n) {
			memcpy(st, st2, n * sizeof *st);
			k1 = query(target, pages2, st2, n);
			if (r0 == 0 && k1 == 0)
				for (long i = 0; i < n; i++) moved += st[i] != st2[i] && st[i] >= 0 && st2[i] >= 0;
		}
		reply("call %ld ret=%ld errno=%d moved=%ld", ln, ret, e, moved);
	} else if (!strcmp(op, "final")) {
		for (int i = 0; i < nregs; i++) {
			long n = regs[i].npages;
			for (long j = 0; j < n; j++) pages2[j] = (void *)(regs[i].addr + j * PS);
			query(0, pages2, st2, n);
			rle(rl, st2, n);
			reply("final p=%d r=%s status=%s", slot, regs[i].name, rl);
		}
		reply("ok");
	} else {
		reply("error line %ld", ln);
	}
}

static void serve(void)
{
	signal(SIGCHLD, SIG_IGN); /* exited scenario processes vanish (ESRCH), no zombies */
	FILE *in = fdopen(dup(cmdp[slot][0]), "r");
	setvbuf(in, NULL, _IONBF, 0);
	for (;;) {
		/* read one line byte by byte: the pipe is shared with forked children */
		size_t n = 0; char c;
		while (read(cmdp[slot][0], &c, 1) == 1 && c != '\n') if (n < sizeof line - 1) line[n++] = c;
		line[n] = 0;
		if (!n || !strcmp(line, "quit")) _exit(0);
		do_op(line);
	}
}

/* ---------------------------------------------------------------- controller (pid 1) */
static pid_t pids[MAXP];
static int alive[MAXP];

static int getline_fd(int fd, char *buf, size_t max)
{
	size_t n = 0; char c;
	while (read(fd, &c, 1) == 1) { if (c == '\n') { buf[n] = 0; return 1; } if (n < max - 1) buf[n++] = c; }
	buf[n] = 0; return n > 0;
}

static void send(int s, const char *l)
{
	size_t n = strlen(l);
	if (write(cmdp[s][1], l, n) != (ssize_t)n || write(cmdp[s][1], "\n", 1) != 1) die("write");
}

static char ans[1 << 18];

static void run_scenarios(char *text)
{
	char *save = NULL, cmd[1 << 16];
	long ln = 0;
	for (char *l = strtok_r(text, "\n", &save); l; l = strtok_r(NULL, "\n", &save)) {
		ln++;
		char *hash = strchr(l, '#'); if (hash) *hash = 0;
		while (*l == ' ') l++;
		if (!*l) continue;
		char op[16]; sscanf(l, "%15s", op);
		if (!strcmp(op, "scenario")) {
			fprintf(out, "%s\n", l); fflush(out);
			for (int i = 0; i < MAXP; i++) {
				if (pipe(cmdp[i]) || pipe(resp[i])) die("pipe");
				alive[i] = 0; pids[i] = 0;
			}
			pid_t p = fork();
			if (!p) { slot = 0; serve(); _exit(0); }
			pids[0] = p; alive[0] = 1;
			continue;
		}
		if (!strcmp(op, "end")) {
			for (int i = 0; i < MAXP; i++) if (alive[i]) {
				send(i, "final");
				while (getline_fd(resp[i][0], ans, sizeof ans) && strcmp(ans, "ok")) fprintf(out, "%s\n", ans);
			}
			for (int i = 0; i < MAXP; i++) if (alive[i]) send(i, "quit");
			while (waitpid(-1, NULL, 0) > 0 || errno == EINTR) ;
			for (int i = 0; i < MAXP; i++) { close(cmdp[i][0]); close(cmdp[i][1]); close(resp[i][0]); close(resp[i][1]); }
			fprintf(out, "end\n"); fflush(out);
			continue;
		}
		int p = iarg(l, "p", 0);
		const char *t = arg(l, "target");
		int tp = !t ? 0 : !strcmp(t, "self") ? 0 : !strcmp(t, "none") ? NO_PID : (pids[atoi(t)] ? pids[atoi(t)] : NO_PID);
		snprintf(cmd, sizeof cmd, "%s L=%ld T=%d", l, ln, tp);
		if (!alive[p]) { fprintf(out, "error line %ld\n", ln); continue; }
		send(p, cmd);
		if (!strcmp(op, "fork")) {
			int c = iarg(l, "child", 0);
			getline_fd(resp[c][0], ans, sizeof ans);  /* "pid N" from the child */
			pids[c] = atoi(ans + 4); alive[c] = 1;
		}
		if (!strcmp(op, "exit")) alive[p] = 0;
		getline_fd(resp[p][0], ans, sizeof ans);
		if (strcmp(ans, "ok")) fprintf(out, "%s\n", ans);
		if (!strcmp(op, "exit")) {
			/* It replies before it exits: wait until it is gone, its memory unmapped,
			 * or the next line races with its teardown (a write that finds a THP still
			 * shared copies it; a call on its pid finds it still there). Orphans
			 * reparented to us are reaped here; bounded to 10 s. */
			for (int k = 0; k < 100000 && (kill(pids[p], 0) == 0 || errno != ESRCH); k++) {
				while (waitpid(-1, NULL, WNOHANG) > 0) ;
				usleep(100);
			}
		}
		fflush(out);
	}
}

int main(void)
{
	mount("proc", "/proc", "proc", 0, NULL);
	mount("sysfs", "/sys", "sysfs", 0, NULL);
	mount("devtmpfs", "/dev", "devtmpfs", 0, NULL);
	wr("/sys/kernel/mm/transparent_hugepage/enabled", "always");
	wr("/sys/kernel/mm/transparent_hugepage/shmem_enabled", "advise");
	wr("/sys/kernel/mm/transparent_hugepage/khugepaged/scan_sleep_millisecs", "4000000000");
	wr("/sys/kernel/mm/transparent_hugepage/khugepaged/alloc_sleep_millisecs", "4000000000");
	wr("/proc/sys/kernel/numa_balancing", "0");
	int o = open("/dev/ttyS1", O_WRONLY | O_NOCTTY);
	if (o < 0) die("open /dev/ttyS1");
	out = fdopen(o, "w");
	int fd = open("/scenarios.txt", O_RDONLY);
	if (fd < 0) die("open /scenarios.txt");
	size_t cap = 1 << 20, n = 0; char *text = malloc(cap); ssize_t k;
	while ((k = read(fd, text + n, cap - n - 1)) > 0) { n += k; if (n + 1 >= cap) text = realloc(text, cap *= 2); }
	text[n] = 0;
	struct utsname_ { char s[6][65]; } u; syscall(SYS_uname, &u);
	fprintf(out, "# kernel %s\n", u.s[2]);
	run_scenarios(text);
	fprintf(out, "# done\n"); fflush(out); fsync(o);
	sync();
	reboot(RB_POWER_OFF);
	return 0;
}

"""Constants user space and tracepoints see, with Linux's values (include/uapi/linux/
mempolicy.h, include/linux/migrate_mode.h's enum migrate_reason). The bottom layer: it
imports nothing from the package, and everything else takes these names from here."""

# move_pages(2) / migrate_pages(2) / mbind(2) flags
MPOL_MF_STRICT = 1 << 0
MPOL_MF_MOVE = 1 << 1
MPOL_MF_MOVE_ALL = 1 << 2

# mbind(2) / set_mempolicy(2) modes
MPOL_DEFAULT, MPOL_PREFERRED, MPOL_BIND, MPOL_INTERLEAVE, MPOL_LOCAL = 0, 1, 2, 3, 4

# enum migrate_reason (6.12), as trace_mm_migrate_pages reports it
MR_COMPACTION = 0
MR_MEMORY_FAILURE = 1
MR_MEMORY_HOTPLUG = 2
MR_SYSCALL = 3           # move_pages(2), migrate_pages(2)
MR_MEMPOLICY_MBIND = 4
MR_NUMA_MISPLACED = 5
MR_CONTIG_RANGE = 6
MR_LONGTERM_PIN = 7
MR_DEMOTION = 8
MR_DAMON = 9
MR_TYPES = 10

#: the names the kernel's tracepoint prints (MIGRATE_REASON in include/trace/events/migrate.h)
MIGRATE_REASON = ("compaction", "memory_failure", "memory_hotplug", "syscall_or_cpuset",
                  "mempolicy_mbind", "numa_misplaced", "contig_range", "longterm_pin", "demotion",
                  "damon")
ALL_REASONS = (1 << MR_TYPES) - 1

"""The memory-management model: physical memory, mem_map, the buddy allocator, processes."""

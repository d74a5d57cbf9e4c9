import os

# torch's CPU allocator backs blocks of 2 MB and more with transparent huge pages when this is set (read once, at its
# first allocation, so it must be set before torch is imported). Every merged tensor's buffers are fresh memory that
# the kernel must fault in and zero: with 4 KB pages that was 7.8 s of system time in a 10.5 s linear merge of two
# 1.3 GB models here, 4.0 s with huge pages. A user's own setting wins.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

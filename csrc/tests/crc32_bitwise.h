/*
 * crc32_bitwise.h - CRC-32 (IEEE 802.3: reflected, polynomial 0xEDB88320, initial value and final xor 0xFFFFFFFF),
 * one bit at a time, for the test tools (tests/test_nnp.c, fuzz/fuzz_parse.c).
 *
 * A reference implementation, written independently of nnp_format.c's table-driven CRC-32, so that a mistake in the
 * library's table or loop cannot hide behind the same mistake in the files the tests write. Slow; test use only.
 */
#ifndef NNP_TESTS_CRC32_BITWISE_H
#define NNP_TESTS_CRC32_BITWISE_H

#include <stddef.h>
#include <stdint.h>

static uint32_t crc32_bitwise(const unsigned char *p, size_t n)
{
    uint32_t c = 0xffffffffu;
    size_t i;
    int k;
    for (i = 0; i < n; i++) {
        c ^= p[i];
        for (k = 0; k < 8; k++) c = (c >> 1) ^ (0xedb88320u & (0u - (c & 1u)));
    }
    return ~c;
}

#endif

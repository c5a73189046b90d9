#include "CFingerprint.h"

#include <string.h>

// Constants: splitmix64 from the seed "provisio" (0x70726F766973696F). keys[j .. j+8) mix
// stripe j of a block; keys[24 .. 32) scramble the lanes after each block; keys[32 .. 40)
// merge the lanes at the end.
static const uint64_t keys[40] = {
    0xC3FFD3027D34BE4FULL, 0x529D36064722821AULL, 0x410875BA8A4681C9ULL, 0x4FA732D7304D5D4AULL,
    0xD4EB1F8D740AF413ULL, 0xDC6ACAEB7A6455CBULL, 0x498E11E7913A8A87ULL, 0x5EDE827301A314D7ULL,
    0x0E1142B2F469FB68ULL, 0x4DE2F6A4DEF64AC0ULL, 0xAE7CA055E4B3FB86ULL, 0xE0C3DB84C8CB610FULL,
    0x60EC2363E2791D33ULL, 0xD83A46901FA7AECAULL, 0x2B52AFA1B31B1DEAULL, 0x7ADD9B899CC2052CULL,
    0x780CE7BE1F39B7BDULL, 0xBC5BF3D8D0D440A9ULL, 0x34C36C335ABDEDF6ULL, 0x671B40DA2A348CA3ULL,
    0xA96AA380FD1D9ED7ULL, 0xA35CF5D2A189D7E6ULL, 0xB04B08265F251DE9ULL, 0xA4D085CA6A636B8DULL,
    0x90846B12DD4B65C8ULL, 0x1B9EEDBE8F3A6903ULL, 0xABF9697493E51974ULL, 0xDA5E5C00FE5E1928ULL,
    0x403F8F04C66C8816ULL, 0xEBEE1049B36D1FBFULL, 0xCBEF620A82C2B668ULL, 0xCC7DB7F21B2DC652ULL,
    0xAA880F84BC3122FCULL, 0x33BD2267383381F4ULL, 0x6330F2AE47AAAB28ULL, 0xB280F86DC9FF8806ULL,
    0x3C78C8E39B7FAB03ULL, 0x6BD56F5CC0F39657ULL, 0x43F684787AA42852ULL, 0x0F53443D1EAB39ADULL,
};

enum { stripeBytes = 64, stripesPerBlock = 16 };

static const uint64_t prime1 = 0x9E3779B185EBCA87ULL;
static const uint64_t prime2 = 0xC2B2AE3D27D4EB4FULL;
static const uint64_t prime3 = 0x165667B19E3779F9ULL;
static const uint64_t prime32 = 0x9E3779B1ULL;

typedef uint64_t lanes4 __attribute__((vector_size(32)));

// The helpers below pass 32-byte vectors by value; they are always inlined, so no call with
// that ABI exists (the warning is about calls between differently compiled functions).
#pragma clang diagnostic ignored "-Wpsabi"

static inline __attribute__((always_inline)) lanes4 load4(const void *p) {
    lanes4 v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline __attribute__((always_inline)) void store4(void *p, lanes4 v) { memcpy(p, &v, sizeof v); }

// One stripe: each lane adds the product of the low and high halves of (data ^ key) (the
// compiler emits a 32×32→64 vector multiply for it) and the neighbouring lane's data word.
static inline __attribute__((always_inline)) void mixStripe(lanes4 *a, lanes4 *b, const unsigned char *p, const uint64_t *k) {
    lanes4 d0 = load4(p), d1 = load4(p + 32);
    lanes4 x0 = d0 ^ load4(k), x1 = d1 ^ load4(k + 4);
    *a += (x0 & 0xFFFFFFFFULL) * (x0 >> 32) + __builtin_shufflevector(d0, d0, 1, 0, 3, 2);
    *b += (x1 & 0xFFFFFFFFULL) * (x1 >> 32) + __builtin_shufflevector(d1, d1, 1, 0, 3, 2);
}

static inline __attribute__((always_inline)) void scramble(lanes4 *a, lanes4 *b) {
    *a = ((*a ^ (*a >> 47)) ^ load4(keys + 24)) * prime32;
    *b = ((*b ^ (*b >> 47)) ^ load4(keys + 28)) * prime32;
}

// Whole stripes from p, continuing at stripe *stripe of the current block; when `copyTo`
// is not NULL the stripes are also stored there (the fused copy).
static inline __attribute__((always_inline)) void stripesBody(uint64_t acc[8], const unsigned char *p, unsigned char *copyTo, size_t count, uint32_t *stripe) {
    lanes4 a = load4(acc), b = load4(acc + 4);
    uint32_t s = *stripe;
    for (size_t i = 0; i < count; i++, p += stripeBytes) {
        if (copyTo) {
            store4(copyTo, load4(p));
            store4(copyTo + 32, load4(p + 32));
            copyTo += stripeBytes;
        }
        mixStripe(&a, &b, p, keys + s);
        if (++s == stripesPerBlock) {
            scramble(&a, &b);
            s = 0;
        }
    }
    *stripe = s;
    store4(acc, a);
    store4(acc + 4, b);
}

static void stripesPortable(uint64_t acc[8], const unsigned char *p, unsigned char *copyTo, size_t count, uint32_t *stripe) {
    stripesBody(acc, p, copyTo, count, stripe);
}

#if defined(__x86_64__)
__attribute__((target("avx2"))) static void stripesAVX2(uint64_t acc[8], const unsigned char *p, unsigned char *copyTo, size_t count, uint32_t *stripe) {
    stripesBody(acc, p, copyTo, count, stripe);
}

static int cpuHasAVX2(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2");
}
#else
static int cpuHasAVX2(void) { return 0; }
#define stripesAVX2 stripesPortable
#endif

typedef void (*StripesFunction)(uint64_t *, const unsigned char *, unsigned char *, size_t, uint32_t *);
// Chosen once; a race between threads choosing writes the same value.
static StripesFunction chosen;

static StripesFunction stripes(void) {
    StripesFunction f = __atomic_load_n(&chosen, __ATOMIC_RELAXED);
    if (!f) {
        f = cpuHasAVX2() ? stripesAVX2 : stripesPortable;
        __atomic_store_n(&chosen, f, __ATOMIC_RELAXED);
    }
    return f;
}

int provision_fingerprint_use_avx2(int wanted) {
    StripesFunction f = wanted && cpuHasAVX2() ? stripesAVX2 : stripesPortable;
    __atomic_store_n(&chosen, f, __ATOMIC_RELAXED);
    return f != stripesPortable;
}

void provision_fingerprint_init(provision_fingerprint_state *state) {
    memset(state, 0, sizeof *state);
    for (int i = 0; i < 8; i++) state->acc[i] = keys[32 + i] ^ prime1;
}

static void feed(provision_fingerprint_state *state, unsigned char *destination, const unsigned char *source, size_t count) {
    StripesFunction run = stripes();
    state->length += count;
    if (state->pending) {
        size_t take = stripeBytes - state->pending;
        if (take > count) take = count;
        memcpy(state->partial + state->pending, source, take);
        if (destination) {
            memcpy(destination, source, take);
            destination += take;
        }
        state->pending += (uint32_t)take;
        source += take;
        count -= take;
        if (state->pending < stripeBytes) return;
        run(state->acc, state->partial, NULL, 1, &state->stripe);
        state->pending = 0;
    }
    size_t whole = count / stripeBytes;
    if (whole) run(state->acc, source, destination, whole, &state->stripe);
    size_t rest = count % stripeBytes;
    if (rest) {
        source += whole * stripeBytes;
        memcpy(state->partial, source, rest);
        if (destination) memcpy(destination + whole * stripeBytes, source, rest);
        state->pending = (uint32_t)rest;
    }
}

void provision_fingerprint_update(provision_fingerprint_state *state, const void *bytes, size_t count) {
    feed(state, NULL, bytes, count);
}

void provision_fingerprint_copy_update(provision_fingerprint_state *state, void *destination, const void *source, size_t count) {
    feed(state, destination, source, count);
}

static uint64_t fold(uint64_t a, uint64_t b) {
    __uint128_t product = (__uint128_t)a * b;
    return (uint64_t)product ^ (uint64_t)(product >> 64);
}

static uint64_t avalanche(uint64_t h) {
    h ^= h >> 33;
    h *= prime2;
    h ^= h >> 29;
    h *= prime3;
    h ^= h >> 32;
    return h;
}

void provision_fingerprint_final(const provision_fingerprint_state *state, uint64_t *high, uint64_t *low) {
    uint64_t acc[8];
    memcpy(acc, state->acc, sizeof acc);
    if (state->pending) {
        // The last partial stripe, zero-padded; the length below tells the padding apart
        // from zeros that were really there.
        unsigned char last[stripeBytes] = {0};
        memcpy(last, state->partial, state->pending);
        uint32_t stripe = state->stripe;
        stripesPortable(acc, last, NULL, 1, &stripe);
    }
    uint64_t h = state->length * prime1, l = ~state->length * prime2;
    for (int i = 0; i < 4; i++) {
        h += fold(acc[2 * i] ^ keys[32 + 2 * i], acc[2 * i + 1] ^ keys[33 + 2 * i]);
        l += fold(acc[i] ^ keys[39 - i], acc[i + 4] ^ keys[32 + i]);
    }
    *high = avalanche(h);
    *low = avalanche(l);
}

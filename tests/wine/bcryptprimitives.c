/*
 * Test-only stand-in for Windows' bcryptprimitives.dll, for running meshca.exe under Wine.
 *
 * Rust's standard library (1.78 and later) draws its randomness from ProcessPrng in
 * bcryptprimitives.dll, present on Windows 10 and later. Wine 8 (Debian 12's wine
 * package) does not provide that export, so a Rust program exits at start-up. Placed
 * next to meshca.exe, this DLL supplies ProcessPrng on top of RtlGenRandom
 * (advapi32's SystemFunction036), which Wine implements from the host's random
 * source. It is used only by tests/wine.rs, is never shipped, and is not needed on
 * Windows itself (whose own DLL is found first: it is a KnownDLL).
 *
 * Build (.ci/run does this):
 *   x86_64-w64-mingw32-gcc -shared -O2 -o bcryptprimitives.dll bcryptprimitives.c -ladvapi32
 */
#include <windows.h>
#include <ntsecapi.h>

/* Fills pbData with cbData random bytes. Like Windows' ProcessPrng it always returns
 * TRUE: a caller has no way to recover, so a failure of the underlying source ends the
 * process instead of handing back predictable bytes. */
__declspec(dllexport) BOOL WINAPI ProcessPrng(PBYTE pbData, SIZE_T cbData)
{
    while (cbData > 0) {
        ULONG chunk = cbData > 0x10000000 ? 0x10000000 : (ULONG)cbData;
        if (!RtlGenRandom(pbData, chunk))
            ExitProcess(0xC0000001); /* STATUS_UNSUCCESSFUL */
        pbData += chunk;
        cbData -= chunk;
    }
    return TRUE;
}

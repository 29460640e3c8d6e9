/*
 * Test-only stand-in for Windows' bcryptprimitives.dll, so that meshca.exe runs under
 * Wine 8 in tests (tests/wine.rs). Never shipped; not needed on Windows.
 *
 * Rust's standard library for Windows imports ProcessPrng from bcryptprimitives.dll
 * (Windows 10 and later) for its randomness. Wine 8, Debian 12's wine, has no such
 * export, so the loader refuses to start any current Rust program. Placed next to
 * meshca.exe, this DLL supplies ProcessPrng on top of RtlGenRandom (advapi32's
 * SystemFunction036), which Wine implements with the host's random source.
 *
 * Build (.ci/run does this; on x86_64 the export needs no .def file):
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

#if canImport(Glibc)
import Glibc
#endif
import ProvisionCShims
import SystemPackage

/// The one seam through which ImageIO touches file descriptors. EINTR is retried here and
/// every other failure comes back as an `Errno`, so callers turn it into an `ImageIOError`
/// that names the device and offset.
enum Syscall {
    static func retrying<T: BinaryInteger>(_ body: () -> T) -> Result<T, Errno> {
        while true {
            let r = body()
            if r >= 0 { return .success(r) }
            let e = Errno(rawValue: Glibc.errno)
            if e != .interrupted { return .failure(e) }
        }
    }

    /// The corresponding C function is `open`.
    static func open(_ path: String, flags: Int32, mode: mode_t = 0o644) -> Result<Int32, Errno> {
        retrying { Glibc.open(path, flags | O_CLOEXEC, mode) }
    }

    /// Writes all of `count` bytes at `offset`, looping over short writes.
    /// The corresponding C function is `pwrite`.
    static func pwriteAll(_ fd: Int32, _ base: UnsafeRawPointer, _ count: Int, _ offset: UInt64) -> Result<Void, Errno> {
        var done = 0
        while done < count {
            switch retrying({ Glibc.pwrite(fd, base + done, count - done, off_t(offset) + off_t(done)) }) {
            case .failure(let e): return .failure(e)
            case .success(0): return .failure(.noSpace)
            case .success(let n): done += n
            }
        }
        return .success(())
    }

    /// Reads up to `count` bytes at `offset`, looping over short reads; stops at end of file.
    /// The corresponding C function is `pread`.
    static func preadFully(_ fd: Int32, _ base: UnsafeMutableRawPointer, _ count: Int, _ offset: UInt64) -> Result<Int, Errno> {
        var done = 0
        while done < count {
            switch retrying({ Glibc.pread(fd, base + done, count - done, off_t(offset) + off_t(done)) }) {
            case .failure(let e): return .failure(e)
            case .success(0): return .success(done)
            case .success(let n): done += n
            }
        }
        return .success(done)
    }

    /// One read of up to `count` bytes at `offset` (a short read is returned as it is: after
    /// one, an O_DIRECT reader cannot simply go on at an unaligned offset).
    /// The corresponding C function is `pread`.
    static func pread(_ fd: Int32, _ base: UnsafeMutableRawPointer, _ count: Int, _ offset: UInt64) -> Result<Int, Errno> {
        retrying { Glibc.pread(fd, base, count, off_t(offset)) }
    }

    /// The corresponding C function is `fdatasync`.
    static func fdatasync(_ fd: Int32) -> Result<Void, Errno> {
        retrying { Glibc.fdatasync(fd) }.map { _ in () }
    }

    /// The corresponding C function is `fstat`.
    static func fstat(_ fd: Int32) -> Result<stat, Errno> {
        var st = stat()
        return retrying { Glibc.fstat(fd, &st) }.map { _ in st }
    }

    static func close(_ fd: Int32) { _ = Glibc.close(fd) }

    static var oDirect: Int32 { provision_o_direct() }
    static var oExclusive: Int32 { provision_o_excl() }
}

import Foundation
import SystemPackage
#if canImport(Glibc)
import Glibc
#endif

/// The one file generated passwords are written to: an append-only, tab-separated list
/// for the operator (time, unit, user, password), mode 0600.
///
/// It is created 0600, and an existing file is refused when group or others can read it,
/// when it is not a regular file, or when someone else owns it: a password list that
/// leaked through a loose mode would undo the point of per-unit passwords.
public struct PasswordExport: Sendable {
    public let path: String

    public init(path: String) { self.path = path }

    /// Appends one line per user that got a generated password; users with given hashes
    /// are skipped. Writes nothing when there is nothing to write.
    public func append(unit: String, users: [InjectedUser], at date: Date = Date()) throws(AccountsError) {
        let generated = users.filter { $0.generatedPassword != nil }
        guard !generated.isEmpty else { return }
        for field in [unit] + generated.map(\.name) where field.contains(where: { $0 == "\t" || $0 == "\n" }) {
            throw AccountsError(.export, "unit or user name \"\(field)\" contains a tab or newline")
        }
        let stamp = ISO8601DateFormatter().string(from: date)
        let lines = generated.map { "\(stamp)\t\(unit)\t\($0.name)\t\($0.generatedPassword!)\n" }.joined()

        let fd: FileDescriptor
        do {
            fd = try FileDescriptor.open(FilePath(path), .writeOnly,
                                         options: [.append, .create, .noFollow, .closeOnExec],
                                         permissions: [.ownerReadWrite])
        } catch {
            throw AccountsError(.export, "cannot open the password export \(path): \(error)")
        }
        defer { try? fd.close() }
        var st = stat()
        guard fstat(fd.rawValue, &st) == 0 else {
            throw AccountsError(.export, "cannot stat the password export \(path): errno \(errno)")
        }
        try verify(st)
        do {
            try fd.writeAll(Array(lines.utf8))
        } catch {
            throw AccountsError(.export, "writing the password export \(path) failed: \(error)")
        }
    }

    /// Whether `append` would accept this path, without creating or changing anything: the
    /// config check runs it, so a card is not written (and its generated password lost)
    /// for an export that was bound to be refused. A missing file needs an existing directory.
    public func check() throws(AccountsError) {
        var st = stat()
        if lstat(path, &st) != 0 {
            guard errno == ENOENT else {
                throw AccountsError(.export, "cannot stat the password export \(path): \(String(cString: strerror(errno)))")
            }
            let directory = (path as NSString).deletingLastPathComponent
            var isDirectory: ObjCBool = false
            guard FileManager.default.fileExists(atPath: directory.isEmpty ? "." : directory, isDirectory: &isDirectory),
                  isDirectory.boolValue else {
                throw AccountsError(.export, "the directory of the password export \(path) does not exist; create it (mode 0700) or change password_export")
            }
            return
        }
        if st.st_mode & S_IFMT == S_IFLNK {
            throw AccountsError(.export, "the password export \(path) is a symbolic link; refusing to write passwords through it")
        }
        try verify(st)
    }

    /// The rules for an existing export file, on its stat.
    private func verify(_ st: stat) throws(AccountsError) {
        guard st.st_mode & S_IFMT == S_IFREG else {
            throw AccountsError(.export, "the password export \(path) is not a regular file; refusing to write passwords to it")
        }
        guard st.st_mode & 0o077 == 0 else {
            throw AccountsError(.export, """
                the password export \(path) has mode \(String(st.st_mode & 0o777, radix: 8)): others can read it; \
                refusing to add passwords. Run chmod 600 \(path) after checking who read it
                """)
        }
        guard st.st_uid == geteuid() else {
            throw AccountsError(.export, "the password export \(path) belongs to uid \(st.st_uid), not to us; refusing to write")
        }
    }
}

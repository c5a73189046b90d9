import Accounts
import Foundation
import TOMLKit

extension Profile {
    static let fileKeys = ["name", "description", "kind", "image", "bmap", "verify", "probe", "min_device_size",
                           "inject", "partitions", "root", "blobs", "users", "tegra"]
    /// Keys that may sit at the top level (next to `image = "…"`) or inside `[image]`.
    static let imageSettingKeys = ["bmap", "verify", "probe", "min_device_size", "inject"]

    /// Loads `images/NAME/profile.toml` (or any profile file). A file called `profile.toml`
    /// must have `name` equal to its directory's name, so the catalog and the file agree.
    public static func load(file path: String) throws -> Profile {
        let text: String
        do {
            text = try String(contentsOfFile: path, encoding: .utf8)
        } catch {
            throw ConfigError(file: path, line: nil, keyPath: "",
                              message: "cannot read the profile: \((error as NSError).localizedDescription)")
        }
        let url = URL(fileURLWithPath: path)
        let directory = url.deletingLastPathComponent()
        let profile = try parse(toml: text, source: path, baseDirectory: directory.path)
        if url.lastPathComponent == "profile.toml", profile.name != directory.lastPathComponent {
            let (_, document) = try TOMLDocument.parse(text: text, source: path, baseDirectory: directory.path)
            throw document.error(at: [.key("name")],
                                 "\"\(profile.name)\" does not match the directory \"\(directory.lastPathComponent)\"; rename one of them")
        }
        return profile
    }

    /// Parses a profile file's text. `source` is the name errors show; relative paths are
    /// resolved against `baseDirectory`.
    public static func parse(toml text: String, source: String, baseDirectory: String) throws -> Profile {
        let (table, document) = try TOMLDocument.parse(text: text, source: source, baseDirectory: baseDirectory)
        let reader = TOMLTableReader(table: table, path: [], document: document)
        try reader.rejectUnknownKeys(fileKeys)
        guard let name = try reader.string("name") else {
            throw reader.error("name", "missing: a profile file needs name = \"…\" (its directory's name)")
        }
        try checkName(name, reader: reader, key: "name")
        return try parseBody(reader, name: name)
    }

    /// Parses an inline profile, `[profiles.NAME]` in a station config: the same keys as a
    /// file without `name`, or only `file = "path/to/profile.toml"` (relative to the config's
    /// directory), in which case the file is loaded and the profile takes the name NAME.
    public static func parse(inline reader: TOMLTableReader, name: String) throws -> Profile {
        try checkName(name, reader: reader, key: nil)
        if let reference = try reader.string("file") {
            try reader.rejectUnknownKeys(["file"])
            let path = reader.document.resolve(path: reference)
            guard FileManager.default.fileExists(atPath: path) else {
                throw reader.error("file", "profile file not found: \(path)")
            }
            var profile = try load(file: path)
            profile.name = name
            return profile
        }
        try reader.rejectUnknownKeys(fileKeys.filter { $0 != "name" } + ["file"])
        return try parseBody(reader, name: name)
    }

    /// Parses an inline profile from a table of an already parsed document, e.g.
    /// `parse(table: profiles["demo"], name: "demo", path: [.key("profiles"), .key("demo")], document: doc)`.
    public static func parse(table: TOMLTable, name: String, path: [TOMLKeyLocator.Segment],
                             document: TOMLDocument) throws -> Profile {
        try parse(inline: TOMLTableReader(table: table, path: path, document: document), name: name)
    }

    static func checkName(_ name: String, reader: TOMLTableReader, key: String?) throws {
        // Names end up in directory names, log fields and the ledger: keep them plain.
        let allowed = TOMLKeyLocator.isBareKey(name.replacingOccurrences(of: ".", with: "_"))
        guard allowed, !name.hasPrefix(".") else {
            throw reader.error(key, "profile name \"\(name)\" must be letters, digits, '-', '_' or '.'")
        }
    }

    static func parseBody(_ reader: TOMLTableReader, name: String) throws -> Profile {
        let kindText = try reader.string("kind") ?? Kind.sd.rawValue
        guard let kind = Kind(rawValue: kindText) else {
            throw reader.error("kind", "unknown kind \"\(kindText)\"; expected \"sd\" or \"tegra\"")
        }
        try checkTablesFit(kind, reader)
        let image = try parseImage(reader)
        let partitions = try (reader.tables("partitions") ?? []).map(parsePartition)
        let blobs = try (reader.tables("blobs") ?? []).map(parseBlob)
        let users = try (reader.tables("users") ?? []).map(parseUser)
        let explicitRoot = try reader.table("root").map(parseRoot)
        let tegra = try reader.table("tegra").map(TegraInputs.parse)
        let injectSetting = try imageSetting(reader, "inject") { try $0.bool($1) }

        let summary = try reader.string("description")
        if let summary, let bad = UserSpec.forbidden(in: summary, also: []) {
            // It is shown on one line of `provision status` and in log fields.
            throw reader.error("description", "contains \(bad); a description is one line")
        }
        var profile = Profile(name: name, summary: summary, kind: kind, image: image,
                              partitions: partitions, root: explicitRoot, blobs: blobs, users: users,
                              inject: injectSetting ?? !users.isEmpty, tegra: tegra,
                              location: reader.document.location(of: reader.path))
        try profile.validate(reader, explicitInject: injectSetting)
        return profile
    }

    /// Tables that belong to the other kind are refused before their contents are read, so the
    /// error says "wrong kind" rather than complaining about a key inside.
    static func checkTablesFit(_ kind: Kind, _ reader: TOMLTableReader) throws {
        switch kind {
        case .sd:
            if reader.contains("tegra") { throw reader.error("tegra", "[tegra] is only for kind = \"tegra\"") }
        case .tegra:
            for key in ["blobs", "users", "root"] where reader.contains(key) {
                throw reader.error(key, "not supported for kind = \"tegra\": the Tegra flow writes only the BCT and U-Boot")
            }
        }
    }

    /// A setting that may be written at the top level or inside `[image]`, but not both.
    static func imageSetting<T>(_ reader: TOMLTableReader, _ key: String,
                                _ get: (TOMLTableReader, String) throws -> T?) throws -> T? {
        let top = try get(reader, key)
        guard let imageTable = reader.value("image")?.table else { return top }
        let nested = TOMLTableReader(table: imageTable, path: reader.path("image"), document: reader.document)
        let inner = try get(nested, key)
        if top != nil, inner != nil {
            throw nested.error(key, "given twice: here and as top-level \(key); keep one")
        }
        return top ?? inner
    }

    static func parseImage(_ reader: TOMLTableReader) throws -> Image? {
        guard let value = reader.value("image") else {
            for key in imageSettingKeys where key != "inject" && reader.contains(key) {
                throw reader.error(key, "\(key) without an image; add image = \"…\"")
            }
            return nil
        }
        let file: String
        if let path = value.string {
            file = path
        } else if let table = try reader.table("image") {
            try table.rejectUnknownKeys(["file"] + imageSettingKeys)
            guard let path = try table.string("file") else {
                throw table.error("file", "missing: [image] needs file = \"…\" (the image to write)")
            }
            file = path
        } else {
            throw reader.mismatch("image", expected: "a file name or an [image] table", found: value)
        }
        guard !file.isEmpty else { throw reader.error("image", "the image file name is empty") }
        let bmap: BmapSource = try imageSetting(reader, "bmap") { reader, key -> BmapSource? in
            guard let value = reader.value(key) else { return nil }
            if let path = value.string { return .file(reader.document.resolve(path: path)) }
            if let enabled = value.bool { return enabled ? .discover : BmapSource.none }
            throw reader.mismatch(key, expected: "a bmap file name, or false to write without one", found: value)
        } ?? .discover
        let location = reader.document.location(of: value.string != nil ? reader.path("image") : reader.path("image") + [.key("file")])
        return Image(file: reader.document.resolve(path: file), bmap: bmap,
                     verify: try imageSetting(reader, "verify") { try $0.bool($1) } ?? true,
                     probe: try imageSetting(reader, "probe") { try $0.bool($1) } ?? true,
                     minDeviceSize: try imageSetting(reader, "min_device_size") { try $0.byteSize($1) },
                     location: location)
    }

    static func parsePartition(_ reader: TOMLTableReader) throws -> Partition {
        try reader.rejectUnknownKeys(["number", "role", "filesystem", "label", "start", "size"])
        guard let number = try reader.integer("number", in: 1...128) else {
            throw reader.error("number", "missing: each [[partitions]] needs number = N (1 = first partition)")
        }
        guard let roleText = try reader.string("role") else {
            throw reader.error("role", "missing: one of \(Partition.Role.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        guard let role = Partition.Role(rawValue: roleText) else {
            throw reader.error("role", "unknown role \"\(roleText)\"; expected one of \(Partition.Role.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        let filesystemText = try reader.string("filesystem") ?? Partition.Filesystem.other.rawValue
        guard let filesystem = Partition.Filesystem(rawValue: filesystemText) else {
            throw reader.error("filesystem", "unknown filesystem \"\(filesystemText)\"; expected one of \(Partition.Filesystem.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        let size = try reader.byteSize("size")
        if size == 0 { throw reader.error("size", "a partition cannot be empty") }
        return Partition(number: number, role: role, filesystem: filesystem, label: try reader.string("label"),
                         start: try reader.byteSize("start"), size: size,
                         location: reader.document.location(of: reader.path))
    }

    static func parseRoot(_ reader: TOMLTableReader) throws -> Root {
        try reader.rejectUnknownKeys(["partition", "label"])
        let number = try reader.integer("partition", in: 1...128)
        let label = try reader.string("label")
        let location = reader.document.location(of: reader.path)
        switch (number, label) {
        case (let number?, nil): return Root(selector: .partition(number), location: location)
        case (nil, let label?): return Root(selector: .label(label), location: location)
        case (.some, .some):
            throw reader.error("label", "[root] has both partition and label; give one of them")
        case (nil, nil):
            throw reader.error(nil, "[root] needs partition = N or label = \"…\"")
        }
    }

    static func parseBlob(_ reader: TOMLTableReader) throws -> Blob {
        try reader.rejectUnknownKeys(["file", "offset"])
        guard let file = try reader.string("file"), !file.isEmpty else {
            throw reader.error("file", "missing: each [[blobs]] needs file = \"…\"")
        }
        guard let offset = try reader.byteSize("offset") else {
            throw reader.error("offset", "missing: each [[blobs]] needs offset = bytes (e.g. 8192 or \"8KiB\")")
        }
        // The write engine writes with O_DIRECT in whole sectors; every board's boot ROM reads
        // its loader from a sector boundary anyway.
        guard offset % 512 == 0 else {
            throw reader.error("offset", "\(offset) is not a multiple of 512 (blobs start on a sector)")
        }
        return Blob(file: reader.document.resolve(path: file), offset: offset,
                    location: reader.document.location(of: reader.path))
    }
}

extension Profile {
    /// Checks that hold across keys; each error points at the key a person has to change.
    /// Fills in `root` from the partition whose role is `root` when `[root]` is not given.
    mutating func validate(_ reader: TOMLTableReader, explicitInject: Bool?) throws {
        switch kind {
        case .sd:
            guard image != nil else {
                var error = reader.error("image", "missing: an sd profile needs image = \"…\" (the image to write)")
                // At the top of a profile file there is no enclosing table line to point at;
                // the line that makes this an sd profile is the next best place.
                if error.line == nil {
                    error.line = ["kind", "name"].lazy.compactMap { reader.document.locator.line(of: reader.path($0)) }.first
                }
                throw error
            }
        case .tegra:
            guard tegra != nil else {
                throw reader.error("tegra", "missing: kind = \"tegra\" needs a [tegra] table (soc, miniloader, bct, uboot, …)")
            }
        }

        try validatePartitions(reader)
        try validateBlobsAmongThemselves()

        var seenUsers: Set<String> = []
        for (index, user) in users.enumerated() where !seenUsers.insert(user.name).inserted {
            throw reader.document.error(at: reader.path("users") + [.index(index), .key("name")],
                                        "user \"\(user.name)\" is listed twice")
        }
        // Each user's values were checked as it was parsed, by the injector's rules
        // (UserSpec.check, in parseUser). Checks of hashes against the crypt methods the
        // image's login supports (issue 15) belong here, beside the other cross-key checks.
        if explicitInject == false, !users.isEmpty {
            throw reader.error("inject", "inject = false but [[users]] are given; remove one of them")
        }
        if kind == .sd, image != nil, inject, root == nil {
            let roots = partitions.filter { $0.role == .root }
            guard roots.count == 1 else {
                throw reader.error("root", roots.isEmpty
                    ? "users are injected but the root partition is unknown: add [root] partition = N or label = \"…\", or a [[partitions]] entry with role = \"root\""
                    : "several partitions have role = \"root\"; say which one gets the users with [root] partition = N")
            }
            root = Root(selector: .partition(roots[0].number), location: roots[0].location)
        }
        try validateRoot(reader)
    }

    func validatePartitions(_ reader: TOMLTableReader) throws {
        var numbers: Set<Int> = []
        var labels: Set<String> = []
        for (index, partition) in partitions.enumerated() {
            let path = reader.path("partitions") + [.index(index)]
            guard numbers.insert(partition.number).inserted else {
                throw reader.document.error(at: path + [.key("number")], "partition \(partition.number) is listed twice")
            }
            if let label = partition.label, !labels.insert(label).inserted {
                throw reader.document.error(at: path + [.key("label")], "label \"\(label)\" is used by two partitions")
            }
        }
        // Stated extents must not overlap: a layout that cannot exist is a typo.
        let placed = partitions.filter { $0.start != nil && $0.size != nil }.sorted { $0.start! < $1.start! }
        for (previous, next) in zip(placed, placed.dropFirst()) where previous.start! + previous.size! > next.start! {
            throw next.location.error("partition \(next.number) starts at \(next.start!) inside partition \(previous.number) (\(previous.start!)–\(previous.start! + previous.size! - 1))")
        }
    }

    func validateRoot(_ reader: TOMLTableReader) throws {
        // ext2/3/4 keep 16 bytes of volume label: a longer one can never match a partition.
        if case .label(let label)? = root?.selector, label.isEmpty || label.utf8.count > 16 {
            throw reader.document.error(at: reader.path("root") + [.key("label")],
                                        "\"\(label)\" cannot be an ext2/3/4 label (1–16 bytes, as e2label sets it)")
        }
        guard let root, !partitions.isEmpty else { return }
        switch root.selector {
        case .partition(let number):
            guard let partition = partitions.first(where: { $0.number == number }) else {
                throw reader.document.error(at: reader.path("root") + [.key("partition")],
                                            "partition \(number) is not among [[partitions]] (\(partitions.map { String($0.number) }.joined(separator: ", ")))")
            }
            if partition.filesystem != .other, !partition.filesystem.isExt {
                throw reader.document.error(at: reader.path("root") + [.key("partition")],
                                            "partition \(number) is \(partition.filesystem.rawValue); users can only be injected into ext2/3/4")
            }
        case .label(let label):
            let declared = partitions.compactMap(\.label)
            if !declared.isEmpty, !declared.contains(label) {
                throw reader.document.error(at: reader.path("root") + [.key("label")],
                                            "no partition is labelled \"\(label)\" (labels: \(declared.joined(separator: ", ")))")
            }
        }
    }
}

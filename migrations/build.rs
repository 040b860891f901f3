// `sqlx::migrate!` embeds `mysql/` at compile time; without this, a newly added migration file
// would not rebuild the crate and the binaries would silently run the old set.
fn main() {
    println!("cargo:rerun-if-changed=mysql");
    println!("cargo:rerun-if-changed=clickhouse");
}

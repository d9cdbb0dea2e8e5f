use clap::Parser;

/// One service of the bookinfo-style sample.
#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    app: mesh_samples::AppArgs,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let shutdown = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    Cli::parse().app.run(shutdown).await?;
    Ok(())
}
